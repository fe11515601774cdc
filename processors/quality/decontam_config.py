"""Keys of ``stages.final.decontamination``: which benchmarks a training sample must not come from."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, model_validator

from builder.config import ExistingPath


class BenchmarkImages(BaseModel):
    """One benchmark's images: a local ``folder`` (searched recursively) or a Hub dataset (``hub``: its repo
    id, read with ``datasets.load_dataset``; images from ``column``)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(min_length=1, description="shown in failure details and the card, e.g. MMBench")
    folder: ExistingPath | None = None
    hub: str | None = Field(None, description="Hub dataset id, e.g. lmms-lab/MMBench")
    config: str | None = Field(None, description="the Hub dataset's config name")
    split: str = "test"
    column: str | list[str] = Field("image", description="the Hub dataset's image column, or several (MMMU: "
                                    "image_1 ... image_7); rows whose image is None are skipped")
    revision: str | None = Field(None, description="the Hub dataset's revision (a commit, branch or tag); "
                                 "give a commit so the benchmark cannot change under a finished run")

    @model_validator(mode="after")
    def _one_source(self) -> "BenchmarkImages":
        if (self.folder is None) == (self.hub is None):
            raise ValueError(f"benchmark {self.name!r}: give exactly one of folder or hub")
        return self


class DecontaminationConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    benchmark_images: list[BenchmarkImages] = Field(
        default_factory=list, description="benchmark image sets; a kept sample whose image equals one (same "
        "decoded pixels) or is near one (CLIP cosine >= near_threshold, or dHash within near_hash_distance bits) "
        "fails as benchmark_image")
    near_threshold: float | None = Field(
        0.95, gt=0, le=1, description="CLIP cosine (the match stage's model) at or above which an image is a near "
        "copy of a benchmark image; null = no CLIP check (it is the one check that embeds images: a GPU worker)")
    # Off by default, on purpose: a default that switched it on would change the rows of every existing config
    # with benchmark_images (near_threshold: null has always meant "exact pixel matches only") while their
    # fingerprints stay the same (fingerprint_config drops fields at their default), so a finished run would
    # keep a plan the code no longer computes. Set, it enters the fingerprint like any non-default key.
    near_hash_distance: int | None = Field(
        None, ge=0, le=16, description="dHash bits (the images stage's 64-bit phash) within which an image is a "
        "near copy of a benchmark image: no model, no GPU; measured, resized (0.5x, 2x) and re-encoded (JPEG q60, "
        "PNG->JPEG) copies are 0-6 bits away and distinct photos and charts 17+, but same-template charts (two "
        "bell-shaped histograms in one style) can be 1-4; 6 is the suggested value (2-pixel crops: up to 7). "
        "Images whose hash is near-flat (blank, plain gradients, a line of text) are no evidence and skipped. "
        "null = off; with near_threshold too, either check fires")
    benchmark_questions: list[ExistingPath] = Field(
        default_factory=list, description="files of benchmark questions (one per line, or JSON lines with a "
        "'question' key); a question sharing a word n-gram with one fails as benchmark_question")
    ngram: int = Field(13, ge=3, description="n-gram length in words (13: the GPT-3 paper's decontamination)")
    min_exact_words: int = Field(
        8, ge=1, description="a question shorter than ngram words is a benchmark question only when it equals "
        "one and has at least this many words (short templates like 'What is shown in the image?' are not)")

    @property
    def enabled(self) -> bool:
        return bool(self.benchmark_images or self.benchmark_questions)
