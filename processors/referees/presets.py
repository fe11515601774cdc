"""Named referees: the paper's three (served by vLLM, so they point at the endpoint backend) and a few
HF-native VLMs the local transformers backend runs directly, plus the offline ``tiny-random-llava``; the
referees of 2026 (Qwen2.5-VL, Qwen3-VL, InternVL3/3.5, GLM-4.1V/4.5V, all vLLM-served) are in
``processors.referees.presets_modern`` with the servers they need, and join ``PRESETS`` below.

A preset fills the settings a user leaves out; anything set explicitly in ``RefereeSettings`` wins.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from processors.referees.factory import Backend
from processors.referees.presets_modern import MODERN_PRESETS


class RefereePreset(BaseModel):
    """What one referee model needs beyond the common settings.

    ``served_model_name`` is the ``model`` field sent to an endpoint (vLLM's ``--served-model-name``) unless
    the endpoint names one; ``max_side`` the longest image side sent. ``mm_processor_kwargs`` are the
    processor settings the referee is meant to run with (InternVL's tile cap ``max_dynamic_patch``): they
    belong on the server (``vllm serve --mm-processor-kwargs``, docs/referees.md) and are sent per request
    only when the referee sets ``endpoint.request_mm_processor_kwargs`` (vLLM refuses per-request ones unless
    started with ``--trust-request-mm-kwargs``). ``system_prompt`` is prepended as a system turn for models
    whose chat template expects one. ``chat_template_kwargs`` are sent with every endpoint request (vLLM
    passes them to the chat template; GLM-4.5V's ``enable_thinking: false``).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str
    backend: Backend
    model_id: str
    served_model_name: str | None = None
    trust_remote_code: bool = False
    mm_processor_kwargs: dict[str, int | bool | dict[str, int]] = Field(default_factory=dict)
    system_prompt: str | None = None
    chat_template_kwargs: dict[str, bool | int | str] = Field(default_factory=dict)
    max_side: int | None = None
    notes: str = ""


PRESETS: dict[str, RefereePreset] = {
    p.name: p
    for p in (
        # The paper's referees. vLLM serves them (docs/referees.md has the commands); max_tokens=1 + logprobs.
        RefereePreset(
            name="glm-4v-9b", backend="endpoint", model_id="THUDM/glm-4v-9b", served_model_name="glm-4v-9b",
            trust_remote_code=True, max_side=1120,
            notes="vLLM needs hf_overrides={'architectures': ['GLM4VForCausalLM']}; one image per prompt; "
            "the image is resized to 1120x1120 whatever its size, so downscale before sending.",
        ),
        RefereePreset(
            name="internvl-chat-v1.5", backend="endpoint", model_id="OpenGVLab/InternVL-Chat-V1-5",
            served_model_name="internvl-chat-v1.5", trust_remote_code=True,
            mm_processor_kwargs={"max_dynamic_patch": 6}, max_side=1344,
            notes="InternVL2 model class in vLLM; 448px tiles dominate the cost, capped by max_dynamic_patch.",
        ),
        RefereePreset(
            name="internvl2-26b", backend="endpoint", model_id="OpenGVLab/InternVL2-26B",
            served_model_name="internvl2-26b", trust_remote_code=True,
            mm_processor_kwargs={"max_dynamic_patch": 6}, max_side=1344,
            notes="Same tiling as InternVL-Chat-V1.5; needs 2 GPUs of 80 GB or tensor parallelism in bf16.",
        ),
        # HF-native VLMs with chat templates for the local backend.
        RefereePreset(name="llava-1.5-7b", backend="local", model_id="llava-hf/llava-1.5-7b-hf", max_side=672),
        RefereePreset(
            name="qwen2-vl-2b", backend="local", model_id="Qwen/Qwen2-VL-2B-Instruct", max_side=768,
            notes="Dynamic resolution: max_side bounds the visual tokens; runs the plain (no prefix reuse) path.",
        ),
        RefereePreset(
            name="smolvlm-instruct", backend="local", model_id="HuggingFaceTB/SmolVLM-Instruct", max_side=768,
        ),
        RefereePreset(
            name="tiny-random-llava", backend="local", model_id="tiny-random-llava",
            notes="Random weights built from configs in memory (processors.referees.tiny): tests and the demo.",
        ),
    )
}


# The referees of 2026 (plain data there, validated here): docs/referees.md, "Modern referees (2026)".
PRESETS.update({spec["name"]: RefereePreset(**spec) for spec in MODERN_PRESETS})


def get_preset(name: str) -> RefereePreset:
    """The preset called ``name``; ``KeyError`` names the known ones."""
    try:
        return PRESETS[name]
    except KeyError:
        raise KeyError(f"unknown referee preset {name!r}; known: {', '.join(sorted(PRESETS))}") from None
