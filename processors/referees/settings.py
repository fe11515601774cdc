"""``RefereeSettings``: the typed, validated settings of one referee, composed into the score stage config."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from processors.referees.presets import PRESETS, RefereePreset, get_preset
from processors.referees.prompt import PROMPT_VERSION


class RefereeEndpoint(BaseModel):
    """Which ``llm.endpoints`` entries serve an endpoint referee (connection details and keys live there,
    never here): ``endpoint`` names one, ``endpoints`` several that share the load image by image; neither
    means the endpoint named like the referee."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    endpoint: str | None = Field(None, min_length=1)
    endpoints: list[str] = Field(default_factory=list)


class RefereeSettings(BaseModel):
    """One referee. ``preset`` names an entry of ``processors.referees.presets.PRESETS``; ``backend``,
    ``model_id`` and ``max_side`` left as ``None`` are taken from it (a preset is required when ``model_id``
    is not given).

    ``reuse``: ``prefix`` computes each image's instruction+image prefix once and shares its KV cache with
    every question about that image; ``none`` runs each row through the processor on its own (always
    possible); ``auto`` uses ``prefix`` where the model allows it. ``endpoint`` names the ``llm.endpoints``
    entries the OpenAI-compatible backend calls (``RefereeEndpoint``).
    """

    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, description="column key of this referee's votes")
    preset: str | None = None
    backend: Literal["local", "endpoint"] | None = None
    model_id: str | None = None
    batch_size: int = Field(default=16, ge=1)
    device: str = "auto"
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = "auto"
    max_side: int | None = Field(default=None, ge=32)
    see_answer: bool = False
    reuse: Literal["auto", "prefix", "none"] = "auto"
    seed: int = 0
    endpoint: RefereeEndpoint = Field(default_factory=lambda: RefereeEndpoint())

    @model_validator(mode="after")
    def _known_preset(self) -> "RefereeSettings":
        if self.preset is not None and self.preset not in PRESETS:
            raise ValueError(f"unknown referee preset {self.preset!r}; known: {', '.join(sorted(PRESETS))}")
        if self.preset is None and self.model_id is None:
            raise ValueError(f"referee {self.name!r}: give a preset or a model_id")
        return self

    def resolved_preset(self) -> RefereePreset:
        """The preset with this referee's explicit settings applied (a bare ``model_id`` makes a local one)."""
        base = get_preset(self.preset) if self.preset else RefereePreset(
            name=self.name, backend="local", model_id=self.model_id or ""
        )
        updates = {
            key: value for key, value in
            (("backend", self.backend), ("model_id", self.model_id), ("max_side", self.max_side))
            if value is not None
        }
        return base.model_copy(update=updates)

    def fingerprint_parts(self) -> dict[str, object]:
        """What changes the votes: goes into the score stage fingerprint (batch size and device do not)."""
        preset = self.resolved_preset()
        return {
            "name": self.name, "backend": preset.backend, "model_id": preset.model_id,
            "max_side": preset.max_side, "see_answer": self.see_answer, "prompt_version": PROMPT_VERSION,
            "dtype": self.dtype,
            "seed": self.seed if preset.model_id.startswith("tiny-random") else None,
            "mm_processor_kwargs": preset.mm_processor_kwargs,
        }
