"""``RefereeSettings``: the typed, validated settings of one referee, composed into the score stage config."""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from processors.referees.factory import Backend, runs_on_device
from processors.referees.presets import PRESETS, RefereePreset, get_preset
from processors.referees.prompt import BLIND_PROMPT_VERSION, PROMPT_VERSION

if TYPE_CHECKING:
    from processors.llm.settings import EndpointSettings


class RefereeEndpoint(BaseModel):
    """Which ``llm.endpoints`` entries serve an endpoint referee (connection details and keys live there,
    never here): ``endpoint`` names one, ``endpoints`` several that share the load image by image; neither
    means the endpoint named like the referee."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    endpoint: str | None = Field(None, min_length=1)
    endpoints: list[str] = Field(default_factory=list)
    vote_constraint: Literal["auto", "structured_outputs", "regex", "logit_bias", "none"] = Field(
        "auto", description="how the server is told to answer exactly one digit: vLLM >= 0.12 "
        "`structured_outputs: {choice: [0, 1]}`, SGLang `regex: [01]`, OpenAI `logit_bias` on the digit tokens, "
        "or nothing; auto = logit_bias for api.openai.com and Azure OpenAI (*.openai.azure.com), "
        "structured_outputs for any other server")
    top_logprobs: int = Field(20, ge=1, description="top logprobs asked for (vLLM's --max-logprobs and OpenAI's "
                              "limit are both 20 by default)")
    request_mm_processor_kwargs: bool = Field(
        False, description="send the preset's processor settings (InternVL's max_dynamic_patch) with every "
        "request; only for a vLLM server started with --trust-request-mm-kwargs (else it answers 400). By "
        "default they are the server's job: --mm-processor-kwargs (docs/referees.md)")


class RuntimeEnv(BaseModel):
    """A Ray ``runtime_env`` for the workers that hold a local referee (``run.engine: ray``): the paper's
    referees pin conflicting ``transformers`` versions, so each may run in its own environment. Ignored by
    the local engine; never part of a fingerprint (the votes depend on the model, not on where it runs)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    pip: list[str] | None = Field(
        None, description='packages to install for this referee, e.g. ["transformers==4.45.2"]')
    conda: str | None = Field(None, description="the name of an existing conda env on every node")
    env_vars: dict[str, str] | None = None

    @model_validator(mode="after")
    def _one_kind(self) -> "RuntimeEnv":
        if self.pip is not None and self.conda is not None:
            raise ValueError("runtime_env: give pip or conda, not both (Ray refuses the pair)")
        return self


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
    backend: Backend | None = None
    model_id: str | None = None
    batch_size: int = Field(default=16, ge=1)
    device: str = "auto"
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = "auto"
    max_side: int | None = Field(default=None, ge=32)
    see_answer: bool = False
    blind: bool = Field(False, description="text only: the model answers the question without the image (never "
                        "sent; processors.referees.blind) and its answer is compared with the sample's - see_answer "
                        "is needed for that comparison only; an endpoint backend; for the final stage's "
                        "blind_referees")
    reuse: Literal["auto", "prefix", "none"] = "auto"
    seed: int = 0
    endpoint: RefereeEndpoint = Field(default_factory=lambda: RefereeEndpoint())
    runtime_env: RuntimeEnv | None = Field(
        None, exclude_if=lambda value: value is None,
        description="engine: ray: the Ray runtime_env of the workers that hold this (local) referee")

    @model_validator(mode="after")
    def _known_preset(self) -> "RefereeSettings":
        if self.preset is not None and self.preset not in PRESETS:
            raise ValueError(f"unknown referee preset {self.preset!r}; known: {', '.join(sorted(PRESETS))}")
        if self.preset is None and self.model_id is None:
            raise ValueError(f"referee {self.name!r}: give a preset or a model_id")
        if self.blind and not self.see_answer:
            raise ValueError(f"referee {self.name!r}: blind needs see_answer: true (its answer is compared with "
                             "the sample's)")
        return self

    def ray_runtime_env(self) -> dict | None:
        """``runtime_env`` as Ray takes it (None: the worker's own environment)."""
        return self.runtime_env.model_dump(exclude_none=True) if self.runtime_env is not None else None

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

    def endpoint_names(self) -> list[str]:
        """The ``llm.endpoints`` serving this referee when it calls endpoints: ``endpoint.endpoints``, else
        ``endpoint.endpoint``, else the one named like the referee."""
        return list(self.endpoint.endpoints) or [self.endpoint.endpoint or self.name]

    def endpoint_overrides(self, endpoint: "EndpointSettings") -> dict[str, object]:
        """What this referee sets on the endpoint it calls: the preset's served model name unless the endpoint
        names a ``model`` itself; the image size from the referee's ``max_side`` (when given), else the
        endpoint's own ``image_max_side``, else the preset's."""
        preset = self.resolved_preset()
        given = endpoint.model_fields_set
        overrides: dict[str, object] = {}
        if preset.served_model_name and "model" not in given:
            overrides["model"] = preset.served_model_name
        if self.max_side is not None:
            overrides["image_max_side"] = self.max_side
        elif preset.max_side is not None and "image_max_side" not in given:
            overrides["image_max_side"] = preset.max_side
        return overrides

    def fingerprint_parts(self) -> dict[str, object]:
        """What changes the votes: goes into the score stage fingerprint (batch size and device do not)."""
        preset = self.resolved_preset()
        return {
            "name": self.name, "backend": preset.backend, "model_id": preset.model_id,
            "max_side": preset.max_side, "see_answer": self.see_answer, "prompt_version": PROMPT_VERSION,
            "dtype": self.dtype,
            "seed": self.seed if preset.model_id.startswith("tiny-random") else None,
            "mm_processor_kwargs": preset.mm_processor_kwargs,
            # how the vote is read changes it (a constrained reply can differ from a free one)
            "vote_constraint": None if runs_on_device(self) else self.endpoint.vote_constraint,
            **({"blind": BLIND_PROMPT_VERSION} if self.blind else {}),  # only when on: others keep their prints
            # only when set (GLM-4.5V's thinking switch): every other referee keeps its fingerprint
            **({"chat_template_kwargs": preset.chat_template_kwargs} if preset.chat_template_kwargs else {}),
        }
