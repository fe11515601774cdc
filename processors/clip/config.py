"""The match stage's config: which CLIP, where it runs, how images and task types are batched."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, StrictInt

from builder.stage import StageConfig


class ClipMatchConfig(StageConfig):
    """Keys of ``stages.match``. ``None`` for batch_size/num_workers means: pick for the device."""

    model: str = Field("ViT-L-14-quickgelu", min_length=1,
                       description="open_clip architecture; tg-tiny-clip is a tiny random one for tests/demo")
    pretrained: str | None = Field("openai", description="open_clip weight tag or checkpoint file; null = random")
    device: str = Field("auto", pattern=r"^(auto|cpu|mps|cuda(:\d+)?)$", description="auto = cuda if visible")
    precision: Literal["auto", "fp32", "bf16", "fp16"] = Field(
        "auto", description="auto = bf16 autocast on a GPU, fp32 on the CPU")
    batch_size: int | None = Field(None, ge=1, description="images per forward pass; default 256 GPU, 16 CPU")
    num_workers: int | None = Field(None, ge=0, description="decode+preprocess processes; 0 = main process")
    top_k: StrictInt = Field(10, ge=1, le=10_000, description="candidates kept per image (paper: 10; released "
                             "code: 5); a whole number (true/false and 2.5 are refused)")
    text_batch_size: int = Field(256, ge=1, description="task texts per forward pass when embedding them")
    score_chunk: int = Field(65536, ge=1, description="task types per similarity matmul (bounds its memory)")
    task_types: Literal["leaves", "all"] = Field(
        "leaves", description="match against leaf paths only (the paper's tasktype.txt) or every node")
    compile: bool | Literal["auto"] = Field(
        "auto", description="torch.compile the image tower (auto = on a GPU: 1.66x model throughput measured on "
        "an H100 for ViT-L/14, ~25 s to compile once per process; falls back to eager if compiling fails)")
    coverage_min: int = Field(
        0, ge=0, description="coverage pass: every leaf task type gets at least this many candidate images, "
        "the images most similar to it added as extra candidates (reverse top-k); 0 = off (the paper). On, all "
        "images are embedded before the first shard (every image's vector is needed at once)")
    coverage_max_extra: int = Field(
        3, ge=1, description="coverage pass: at most this many task types added to one image (its filter "
        "prompt shows top_k + this many candidates: stages.filter.max_candidates must allow them)")
    fast_decode: bool = Field(
        True, description="decode JPEGs at the smallest DCT scale that still covers the model's input size "
        "(2-3x less decode and resize work; pixels differ slightly from a full-size decode)")
