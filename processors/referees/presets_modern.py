"""Referees people choose in 2026: Qwen2.5-VL, Qwen3-VL, InternVL3 / InternVL3.5 and GLM-4.1V / GLM-4.5V, each
served by vLLM (``backend: endpoint``), with the server it needs (``VLLM_SERVE``) and the ``vllm serve`` command
built from both (``serve_command``; the commands in docs/referees.md, "Modern referees (2026)", are these).

Plain data: ``processors.referees.presets`` turns ``MODERN_PRESETS`` into ``RefereePreset``s (validated there);
this module imports nothing of the project, so there is no cycle.

Where the facts come from (docs/referees.md says the same per row):

- the architecture of every model is a key of vLLM's ``_MULTIMODAL_MODELS``
  (``vllm/model_executor/models/registry.py``) and a row of ``docs/models/supported_models.md``; no model here
  needs ``--hf-overrides`` (only the paper's GLM-4V-9B does), and only InternVL (``InternVLChatModel``, the
  checkpoints' own code) needs ``--trust-remote-code``;
- the processor settings: InternVL's ``max_dynamic_patch`` as vLLM's InternVL processor takes it; Qwen2.5-VL's
  flat ``min_pixels``/``max_pixels`` as vLLM's own example passes them; Qwen3-VL's ``size`` dict
  (``shortest_edge``/``longest_edge`` in pixels, the shape of its ``preprocessor_config.json``), which vLLM's
  Qwen3-VL processor reads (vllm-project/vllm PR #34402);
- the image sizes are ours, chosen from the models' patch geometry on their model cards (Qwen2.5-VL and
  GLM-4.1V/4.5V: 28 px per visual token, Qwen3-VL: 32 px, InternVL: 448 px tiles of 256 tokens): each keeps an
  image at about 1,000-1,800 visual tokens, plenty for a yes/no fit judgment.

A vote reads the first token (``max_tokens: 1``, a constrained ``0``/``1``), so only instruct (non-thinking)
checkpoints are listed, except GLM-4.1V-9B-Thinking, which has no instruct sibling (its vote is the forced first
token, without the reasoning it was trained to write first: notes say so). GLM-4.5V's thinking is switched off
per request (``chat_template_kwargs: {enable_thinking: false}``). Never start a referee's server with
``--reasoning-parser``: the one token of the reply could be filed as reasoning and the vote lost.
"""

from __future__ import annotations

import json
import shlex
from dataclasses import dataclass, field

# Client-side image sizes (longest side, px). Qwen2.5-VL and GLM-4.xV: 35 x 28 px -> at most 35 x 35 = 1,225
# visual tokens; Qwen3-VL: 32 x 32 px -> at most 1,024; InternVL: 3 tiles of 448 px a side (6-tile cap).
QWEN25_SIDE = 980
QWEN25_MAX_PIXELS = 1280 * 28 * 28  # 1,003,520 >= 980 x 980: the server never shrinks what we send
QWEN25_MIN_PIXELS = 4 * 28 * 28  # the checkpoints' own minimum (preprocessor_config.json: 3136)
QWEN3_SIDE = 1024
QWEN3_MAX_PIXELS = 1024 * 1024  # size.longest_edge (pixels, not px of a side); the checkpoints allow 4096^2
QWEN3_MIN_PIXELS = 256 * 256  # size.shortest_edge: the checkpoints' own 65,536
INTERNVL_SIDE = 1344
INTERNVL_TILES = 6  # the checkpoints' default cap is 12 (3,328 image tokens); 6 + thumbnail = 1,792 tokens
GLM_SIDE = 980


@dataclass(frozen=True)
class VllmServe:
    """What a ``vllm serve`` for one referee needs beyond the preset (which gives the model id, served name,
    ``--trust-remote-code`` and ``--mm-processor-kwargs``). ``architecture`` is the model's key in vLLM's
    registry (``vllm/model_executor/models/registry.py``), for the reader and the tests; vLLM reads it from the
    checkpoint's config itself."""

    architecture: str
    max_model_len: int = 4096
    tensor_parallel_size: int = 1
    limit_mm_per_prompt: dict[str, int] = field(default_factory=lambda: {"image": 1, "video": 0})
    hf_overrides: dict[str, object] | None = None
    hardware: str = ""


def _qwen25(size: str, tp: int, hardware: str) -> tuple[dict, VllmServe]:
    return (
        dict(name=f"qwen2.5-vl-{size.lower()}", backend="endpoint", model_id=f"Qwen/Qwen2.5-VL-{size}-Instruct",
             served_model_name=f"qwen2.5-vl-{size.lower()}", max_side=QWEN25_SIDE,
             mm_processor_kwargs={"min_pixels": QWEN25_MIN_PIXELS, "max_pixels": QWEN25_MAX_PIXELS},
             notes="Dynamic resolution, 28 px per visual token: 980 px -> at most 1,225 tokens. The server's "
             "max_pixels also bounds vLLM's memory profiling (its default is 12.8 MP, 16,384 tokens)."),
        VllmServe("Qwen2_5_VLForConditionalGeneration", tensor_parallel_size=tp, hardware=hardware),
    )


def _qwen3(size: str, tp: int, hardware: str, moe: bool = False) -> tuple[dict, VllmServe]:
    return (
        dict(name=f"qwen3-vl-{size.lower()}", backend="endpoint", model_id=f"Qwen/Qwen3-VL-{size}-Instruct",
             served_model_name=f"qwen3-vl-{size.lower()}", max_side=QWEN3_SIDE,
             mm_processor_kwargs={"size": {"shortest_edge": QWEN3_MIN_PIXELS, "longest_edge": QWEN3_MAX_PIXELS}},
             notes="Instruct (non-thinking) checkpoint; 32 px per visual token: 1024 px -> at most 1,024 tokens. "
             "size is in pixels (the checkpoint's preprocessor_config.json shape)."),
        VllmServe("Qwen3VLMoeForConditionalGeneration" if moe else "Qwen3VLForConditionalGeneration",
                  tensor_parallel_size=tp, hardware=hardware),
    )


def _internvl(family: str, repo: str, size: str, tp: int, hardware: str) -> tuple[dict, VllmServe]:
    return (
        dict(name=f"{family}-{size.lower()}", backend="endpoint", model_id=f"OpenGVLab/{repo}-{size}",
             served_model_name=f"{family}-{size.lower()}", trust_remote_code=True, max_side=INTERNVL_SIDE,
             mm_processor_kwargs={"max_dynamic_patch": INTERNVL_TILES},
             notes="InternVLChatModel (the checkpoint's own code); 448 px tiles of 256 tokens, capped at 6 + a "
             "thumbnail (the checkpoint's default is 12)."),
        VllmServe("InternVLChatModel", tensor_parallel_size=tp, hardware=hardware),
    )


_ENTRIES: tuple[tuple[dict, VllmServe], ...] = (
    # Qwen2.5-VL (the 3B and 72B are vLLM's own examples of the architecture)
    _qwen25("3B", 1, "any GPU of 16 GB"),
    _qwen25("7B", 1, "one GPU of 24 GB"),
    _qwen25("32B", 2, "two 80 GB GPUs in bf16 (~67 GB of weights)"),
    _qwen25("72B", 4, "four 80 GB GPUs in bf16 (~146 GB of weights)"),
    # Qwen3-VL: every size released (dense 2B/4B/8B/32B, MoE 30B-A3B/235B-A22B), instruct checkpoints
    _qwen3("2B", 1, "any GPU of 16 GB"),
    _qwen3("4B", 1, "one GPU of 24 GB"),
    _qwen3("8B", 1, "one GPU of 40 GB"),
    _qwen3("32B", 2, "two 80 GB GPUs in bf16"),
    _qwen3("30B-A3B", 2, "two 80 GB GPUs in bf16 (~62 GB of weights; 3B active, so fast per token)", moe=True),
    _qwen3("235B-A22B", 8, "eight 80 GB GPUs in bf16 (vLLM's recipe: the -FP8 checkpoint on H100)", moe=True),
    # InternVL3 and InternVL3.5 (InternVL3_5-* on the Hub)
    _internvl("internvl3", "InternVL3", "2B", 1, "any GPU of 16 GB"),
    _internvl("internvl3", "InternVL3", "8B", 1, "one GPU of 40 GB"),
    _internvl("internvl3", "InternVL3", "38B", 2, "two 80 GB GPUs in bf16"),
    _internvl("internvl3", "InternVL3", "78B", 4, "four 80 GB GPUs in bf16"),
    _internvl("internvl3.5", "InternVL3_5", "4B", 1, "one GPU of 24 GB"),
    _internvl("internvl3.5", "InternVL3_5", "8B", 1, "one GPU of 40 GB"),
    _internvl("internvl3.5", "InternVL3_5", "38B", 2, "two 80 GB GPUs in bf16"),
    # GLM-4.1V / GLM-4.5V (zai-org, formerly THUDM): transformers-native, no remote code
    (
        dict(name="glm-4.1v-9b-thinking", backend="endpoint", model_id="zai-org/GLM-4.1V-9B-Thinking",
             served_model_name="glm-4.1v-9b-thinking", max_side=GLM_SIDE,
             notes="A reasoning model with no instruct sibling: the vote is the constrained first token, read "
             "without the <think> it was trained to write first. 28 px per visual token: 980 px -> 1,225 tokens."),
        VllmServe("Glm4vForConditionalGeneration", hardware="one GPU of 40 GB"),
    ),
    (
        dict(name="glm-4.5v", backend="endpoint", model_id="zai-org/GLM-4.5V", served_model_name="glm-4.5v",
             max_side=GLM_SIDE, chat_template_kwargs={"enable_thinking": False},
             notes="106B MoE (12B active). Thinking off per request (chat_template_kwargs), so the first token is "
             "the answer. 28 px per visual token: 980 px -> 1,225 tokens."),
        VllmServe("Glm4vMoeForConditionalGeneration", tensor_parallel_size=4,
                  hardware="four 80 GB GPUs in bf16 (~216 GB; zai-org/GLM-4.5V-FP8 on fewer)"),
    ),
)

MODERN_PRESETS: tuple[dict, ...] = tuple(spec for spec, _ in _ENTRIES)
VLLM_SERVE: dict[str, VllmServe] = {spec["name"]: serve for spec, serve in _ENTRIES}
_SPECS: dict[str, dict] = {spec["name"]: spec for spec in MODERN_PRESETS}


def _json(value: object) -> str:
    return json.dumps(value, separators=(", ", ": "))


def serve_args(name: str, port: int = 8000) -> list[str]:
    """The ``vllm serve`` arguments for the modern preset ``name`` (vLLM >= 0.12 flag names)."""
    if name not in VLLM_SERVE:
        raise KeyError(f"{name!r} is no modern referee preset; known: {', '.join(VLLM_SERVE)}")
    spec, serve = _SPECS[name], VLLM_SERVE[name]
    args = ["vllm", "serve", spec["model_id"], "--served-model-name", spec.get("served_model_name") or name]
    if spec.get("trust_remote_code"):
        args.append("--trust-remote-code")
    if serve.hf_overrides:
        args += ["--hf-overrides", _json(serve.hf_overrides)]
    args += ["--dtype", "bfloat16", "--max-model-len", str(serve.max_model_len),
             "--limit-mm-per-prompt", _json(serve.limit_mm_per_prompt)]
    if spec.get("mm_processor_kwargs"):
        args += ["--mm-processor-kwargs", _json(spec["mm_processor_kwargs"])]
    if serve.tensor_parallel_size > 1:
        args += ["--tensor-parallel-size", str(serve.tensor_parallel_size)]
    return [*args, "--port", str(port)]


def serve_command(name: str, port: int = 8000) -> str:
    """``serve_args`` as one shell line (JSON values single-quoted)."""
    return shlex.join(serve_args(name, port))
