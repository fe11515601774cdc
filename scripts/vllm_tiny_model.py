"""Write the tiny random Llava (processors.referees.tiny) as a Hugging Face model folder that vLLM can serve.

Run with the project's .venv (it has transformers and the builder); vLLM then serves the folder from its own
venv. vLLM 0.32 expects the vision tower's weights under ``vision_tower.vision_model.*``, while transformers 5
saves them as ``vision_tower.*``: the keys are renamed in the saved safetensors file.

    .venv/bin/python scripts/vllm_tiny_model.py OUT_DIR
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def rename_vision_keys(folder: Path) -> int:
    """Rename ``vision_tower.X`` to ``vision_tower.vision_model.X`` in every safetensors file; returns how many."""
    from safetensors.torch import load_file, save_file

    renamed = 0
    for path in sorted(folder.glob("*.safetensors")):
        tensors = load_file(str(path))
        out = {}
        for key, value in tensors.items():
            for prefix in ("model.vision_tower.", "vision_tower."):
                if key.startswith(prefix) and not key.startswith(prefix + "vision_model."):
                    key = "vision_tower.vision_model." + key[len(prefix):]
                    renamed += 1
                    break
            else:
                if key.startswith("model.language_model."):
                    key = "language_model.model." + key[len("model.language_model."):]
                elif key.startswith("lm_head."):
                    key = "language_model.lm_head." + key[len("lm_head."):]
                elif key.startswith("model.multi_modal_projector."):
                    key = "multi_modal_projector." + key[len("model.multi_modal_projector."):]
            out[key] = value.contiguous()
        save_file(out, str(path), metadata={"format": "pt"})
    return renamed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    from processors.referees.tiny import TinyLlavaSpec, build_tiny_llava

    # vLLM's CPU attention kernels support head sizes of 32 and up (the test spec's 16 is refused).
    spec = TinyLlavaSpec(text_hidden=128, text_heads=2, text_intermediate=256)
    model, processor = build_tiny_llava(spec, seed=args.seed)
    args.out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(args.out), safe_serialization=True)
    processor.save_pretrained(str(args.out))
    processor.tokenizer.save_pretrained(str(args.out))
    renamed = rename_vision_keys(args.out)
    (args.out / "taskgalaxy-tiny.json").write_text(json.dumps({"seed": args.seed, "renamed_keys": renamed}))
    print(f"tiny Llava written to {args.out} ({renamed} vision keys renamed)")


if __name__ == "__main__":
    main()
