"""Loading an open_clip model once per process, with device and precision resolved from the config.

Models are cached in this module keyed by (model, pretrained, device, precision): a stage's batch function is
rebuilt for every shard, the model is not. ``tg-tiny-clip`` is our own tiny architecture (random weights
only) for tests and the offline demo; it is registered with open_clip the first time a model is loaded, never
at import.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

logger = logging.getLogger(__name__)

TINY_MODEL = "tg-tiny-clip"
RANDOM_WEIGHTS_SEED = 0
# A 2-layer ViT on 32x32 pixels and a 2-layer text tower: builds in milliseconds, ~3.5M parameters (mostly
# the token embedding: the vocabulary must match open_clip's bundled tokenizer).
TINY_CONFIGS: dict[str, dict[str, Any]] = {
    TINY_MODEL: {
        "embed_dim": 32,
        "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "patch_size": 8, "head_width": 32},
        "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
    }
}

_LOCK = threading.Lock()
_MODELS: dict[tuple[str, str | None, str, str], "LoadedClip"] = {}
_registered = False


@dataclass
class LoadedClip:
    """A model ready for inference plus what it takes to feed it."""

    name: str
    pretrained: str | None
    model: Any  # open_clip.CLIP, in eval mode, on ``device``
    preprocess: Any  # PIL image -> CHW float tensor (open_clip's eval transform)
    tokenizer: Any
    device: "torch.device"
    precision: str  # "fp32" | "bf16" | "fp16"
    resize_mode: str  # open_clip preprocess resize mode ("shortest" = resize short side, then centre crop)
    input_side: int  # the square the model takes (224 for ViT-L/14): decoding never needs more

    def autocast(self) -> contextlib.AbstractContextManager:
        """bf16/fp16 autocast on the model's device; a no-op context for fp32."""
        import torch

        if self.precision == "fp32":
            return contextlib.nullcontext()
        dtype = torch.bfloat16 if self.precision == "bf16" else torch.float16
        return torch.autocast(device_type=self.device.type, dtype=dtype)


def resolve_device(device: str) -> str:
    """``auto`` -> ``cuda`` when a GPU is visible, else ``cpu``; anything else is passed to torch as given."""
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def resolve_precision(precision: str, device: str) -> str:
    """``auto`` -> bf16 on a GPU that supports it (fp16 on older ones), fp32 on the CPU."""
    import torch

    if precision != "auto":
        return precision
    if device.startswith("cuda"):
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "fp32"


def register_tiny_configs() -> None:
    """Make our tiny architectures known to open_clip, which only reads configs from JSON files on disk: they
    are written to a temp folder named by their content (shared by every process, rewritten atomically)."""
    global _registered
    if _registered:
        return
    import open_clip

    text = json.dumps(TINY_CONFIGS, sort_keys=True)
    folder = Path(tempfile.gettempdir()) / f"tg-open-clip-configs-{hashlib.sha256(text.encode()).hexdigest()[:12]}"
    folder.mkdir(parents=True, exist_ok=True)
    for name, config in TINY_CONFIGS.items():
        tmp = folder / f".{name}.{os.getpid()}.tmp"  # not *.json: open_clip must never read half a file
        tmp.write_text(json.dumps(config), encoding="utf-8")
        tmp.replace(folder / f"{name}.json")
    open_clip.add_model_config(folder)
    _registered = True


def load_clip(name: str, pretrained: str | None, device: str = "auto", precision: str = "auto") -> LoadedClip:
    """The model ``name`` with weights ``pretrained`` (an open_clip tag or a checkpoint file; None = random).

    Returns the cached instance when the same model was loaded before in this process.
    """
    device = resolve_device(device)
    precision = resolve_precision(precision, device)
    key = (name, pretrained, device, precision)
    with _LOCK:
        if key not in _MODELS:
            _MODELS[key] = _build(name, pretrained, device, precision)
        return _MODELS[key]


def clear_model_cache() -> None:
    """Forget every loaded model (tests; freeing GPU memory between runs)."""
    with _LOCK:
        _MODELS.clear()


def _build(name: str, pretrained: str | None, device: str, precision: str) -> LoadedClip:
    import open_clip
    import torch

    register_tiny_configs()
    if name not in open_clip.list_models():
        raise ValueError(f"stages.match.model: unknown open_clip model {name!r}; e.g. ViT-L-14-quickgelu, "
                         f"ViT-B-32, {TINY_MODEL}")
    if pretrained and name in TINY_CONFIGS:
        raise ValueError(f"stages.match.pretrained: {TINY_MODEL} has no released weights; set it to null")
    logger.info("loading CLIP %s (weights: %s) on %s, %s", name, pretrained or "random", device, precision)
    try:
        # Random weights are drawn from a fixed seed (without touching the caller's RNG), so a run with
        # pretrained: null (the demo, the tests) matches the same images to the same task types every time.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(RANDOM_WEIGHTS_SEED)
            model, _, preprocess = open_clip.create_model_and_transforms(
                name, pretrained=pretrained, device=device, precision=precision
            )
    except RuntimeError as exc:
        if pretrained and "download" in str(exc).lower():
            raise RuntimeError(
                f"stages.match.pretrained: cannot fetch weights {pretrained!r} for {name} ({exc}). They are "
                "downloaded once into the Hugging Face cache: run once with network access, or point "
                "`pretrained` at a local checkpoint file, or use pretrained: null for random weights"
            ) from exc
        raise
    model.eval()
    preprocess_cfg = open_clip.get_model_preprocess_cfg(model)
    resize_mode = preprocess_cfg.get("resize_mode") or "shortest"
    size = preprocess_cfg.get("size", 224)
    return LoadedClip(
        name=name,
        pretrained=pretrained,
        model=model,
        preprocess=preprocess,
        tokenizer=open_clip.get_tokenizer(name),
        device=torch.device(device),
        precision=precision,
        resize_mode=resize_mode,
        input_side=max(size) if isinstance(size, (tuple, list)) else int(size),
    )
