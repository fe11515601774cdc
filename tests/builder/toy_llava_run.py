"""A finished run small enough for a test, with what ``export`` and ``push`` read: an ``images`` stage (the
toy one: files of a folder under the root ``toy``) and a ``final`` stage of LLaVA records, one per image."""

from __future__ import annotations

from pathlib import Path

import datasets
from PIL import Image

from builder.config import build_config_model, validate_config
from builder.rows import BatchOutput
from builder.runner import Runner
from builder.stage import Stage, StageConfig
from toy_stages import ToyImages


class ToyLlavaFinal(Stage):
    """One LLaVA record per image of the toy images stage."""

    name = "final"
    Config = StageConfig
    key = "id"
    upstream = "images"

    def input_key(self, config):
        return "image_id"

    def features(self, config):
        string = datasets.Value("string")
        return datasets.Features({"id": string, "image": string, "task_type": string,
                                  "conversations": [{"from": string, "value": string}]})

    def make_batch_fn(self, config, ctx):
        def fn(batch):
            out = BatchOutput(["id", "image", "task_type", "conversations"])
            for image_id, path in zip(batch["image_id"], batch["path"]):
                out.add(image_id, {"id": f"q-{image_id[:12]}", "image": path, "task_type": "OCR~Signs",
                                   "conversations": [{"from": "human", "value": "<image>\nWhat does it say?"},
                                                     {"from": "gpt", "value": "STOP"}]})
            return out.to_columns()

        return fn


STAGES = [ToyImages(), ToyLlavaFinal()]


def make_pictures(folder: Path, names=("a.png", "b.png", "c.png")) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for shade, name in enumerate(names):
        Image.new("RGB", (4, 4), (40 * shade, 90, 200)).save(folder / name, format="PNG")
    return folder


def finished_llava_run(base: Path, pictures: Path | None = None) -> Path:
    """Run the two toy stages over ``pictures`` (default: three PNGs under ``base/pictures``); the run folder."""
    pictures = pictures or make_pictures(base / "pictures")
    settings = {"run": {"name": "llava", "shard_size": 2}, "stages": {"images": {"folder": str(pictures)}}}
    config = validate_config(settings, build_config_model(STAGES), base_dir=base)
    run_dir = base / "run"
    Runner(STAGES, config, run_dir, progress=False).run()
    return run_dir
