"""A real trainer consumes the TRL export: TRL's ``SFTTrainer`` trains two optimizer steps on it (issue 23, item 3).

The export's contract (``taskgalaxy export RUN --format trl --out DIR``): DIR is a Parquet folder that
``datasets.load_dataset(str(DIR), split="train")`` reads, with ``id`` (string), ``messages`` (role + a list of
typed parts ``{"type": "image"|"text", "text": str|None}``, the user turn's image part first, no ``<image>``
token) and ``images`` (``List(Image())``, bytes embedded). The dataset comes from a real demo dry run exported by
the CLI; ``write_trl_fixture`` (same contract, real photos) stands in only while ``--format trl`` is missing.

The model is a tiny random Qwen2-VL built offline from configs (tests/trainers/tiny_qwen2_vl.py), with its own
processor and chat template; TRL picks its vision collator by itself (the dataset has ``images`` and the
processing class is a processor). Proven here: every exported row reaches the collator, each batch's images
become ``pixel_values``, the loss is finite and the weights change.
"""

from __future__ import annotations

import io
import math
import warnings
from pathlib import Path

import pytest

pytestmark = pytest.mark.filterwarnings("ignore:`gradient_checkpointing` is deprecated:FutureWarning")  # TRL's own field
trl = pytest.importorskip("trl", reason="trl is not installed (it is in the dev extras: pip install -e '.[dev]')")

import datasets  # noqa: E402
import torch  # noqa: E402

from tiny_qwen2_vl import build_tiny_qwen2_vl  # noqa: E402  (tests/conftest.py puts tests/trainers on sys.path)

from taskgalaxy import main  # noqa: E402

# The end-to-end demo's config (tests/test_end_to_end.py), cut to one endpoint referee and the tiny Llava.
DEMO_CONFIG = """
run: {name: trl, shard_size: 16}
llm:
  endpoints:
    gpt4o: {model: gpt-4o-2024-08-06, image_max_side: 256}
    referee_a: {base_url: "http://localhost:9/v1", api_key_env: null, model: internvl-chat-v1.5}
stages:
  taxonomy: {levels: 2, rounds_per_level: 1, children_per_request: 4, new_first_level_per_round: 2, plots: false}
  images:
    sources: [{type: synthetic, count: 8, seed: 3}]
  match: {model: tg-tiny-clip, pretrained: null, top_k: 4}
  score:
    referees:
      - {name: tiny_llava, preset: tiny-random-llava, batch_size: 8}
      - {name: referee_a, preset: internvl-chat-v1.5, endpoint: {endpoint: referee_a}}
  final: {threshold: 1}
"""
STEPS = 2
BATCH = 2
MAX_ROWS = 64  # the test's time grows with the rows (gradient accumulation keeps it at two optimizer steps)


def trl_export_available() -> bool:
    """True when ``taskgalaxy export`` has ``--format trl``."""
    import contextlib

    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.suppress(SystemExit):
        main(["export", "--help"])
    return "--format" in out.getvalue() and "trl" in out.getvalue()


def write_trl_fixture(out: Path, rows: int = 4) -> Path:
    """A Parquet folder with the TRL export's exact contract, from real photos and drawn images (fallback only)."""
    import matplotlib.cbook
    from PIL import Image, ImageDraw

    photos = [Image.open(matplotlib.cbook.get_sample_data(name)).convert("RGB")
              for name in ("grace_hopper.jpg", "Minduka_Present_Blue_Pack.png")]
    for i, colour in enumerate(("red", "navy")):
        drawn = Image.new("RGB", (320 + 40 * i, 240), "white")
        ImageDraw.Draw(drawn).ellipse((60, 40, 260, 200), fill=colour)
        photos.append(drawn)
    records = []
    for i in range(rows):
        buf = io.BytesIO()
        photos[i % len(photos)].save(buf, format="JPEG", quality=85)
        records.append({
            "id": f"fixture-{i:04d}",
            "messages": [
                {"role": "user", "content": [{"type": "image", "text": None},
                                             {"type": "text", "text": f"Question {i}: what is the main object here?"}]},
                {"role": "assistant", "content": [{"type": "text", "text": f"Answer {i}: an object."}]},
            ],
            "images": [{"bytes": buf.getvalue(), "path": None}],
        })
    part = {"type": datasets.Value("string"), "text": datasets.Value("string")}
    features = datasets.Features({
        "id": datasets.Value("string"),
        "messages": datasets.List({"role": datasets.Value("string"), "content": datasets.List(part)}),
        "images": datasets.List(datasets.Image()),
    })
    out.mkdir(parents=True, exist_ok=True)
    datasets.Dataset.from_list(records, features=features).to_parquet(str(out / "train-00000-of-00001.parquet"))
    return out


@pytest.fixture(scope="module")
def trl_export(tmp_path_factory) -> tuple[Path, str]:
    """``(folder, where it came from)``: the CLI's TRL export of a demo dry run, or the fixture if that is missing."""
    root = tmp_path_factory.mktemp("trl")
    if not trl_export_available():
        warnings.warn("taskgalaxy export has no --format trl: TRL trains on the contract fixture instead", stacklevel=1)
        return write_trl_fixture(root / "fixture"), "fixture"
    config = root / "demo.yaml"
    config.write_text(DEMO_CONFIG)
    assert main(["run", str(config), "--dry-run", "--run-dir", str(root / "run"), "--no-progress"]) == 0
    out = root / "trl"
    assert main(["export", str(root / "run"), "--format", "trl", "--out", str(out)]) == 0
    return out, "export"


def test_export_has_the_trl_contract(trl_export):
    folder, _ = trl_export
    ds = datasets.load_dataset(str(folder), split="train")
    assert 0 < len(ds) <= MAX_ROWS, len(ds)
    assert isinstance(ds.features["images"], datasets.List) and isinstance(ds.features["images"].feature, datasets.Image)
    assert len(set(ds["id"])) == len(ds)
    for row in ds:
        user = row["messages"][0]
        assert user["role"] == "user" and user["content"][0]["type"] == "image"
        assert sum(part["type"] == "image" for m in row["messages"] for part in m["content"]) == len(row["images"]) >= 1
        assert not any("<image>" in (part["text"] or "") for m in row["messages"] for part in m["content"])
        assert row["messages"][-1]["role"] == "assistant" and row["messages"][-1]["content"][0]["text"]
        assert all(img.size[0] > 0 for img in row["images"])


def test_sft_trainer_trains_two_steps_on_every_row(trl_export, tmp_path):
    from trl import SFTConfig, SFTTrainer

    folder, source = trl_export
    ds = datasets.load_dataset(str(folder), split="train")
    n = len(ds)
    print(f"TRL SFTTrainer on the {source}: {n} rows")
    # One epoch of exactly STEPS optimizer steps: every row once, none twice.
    batches = math.ceil(n / BATCH)
    accumulation = math.ceil(batches / STEPS)
    assert math.ceil(batches / accumulation) == STEPS, f"{n} rows cannot fill {STEPS} steps of {BATCH} in one epoch"
    torch.manual_seed(0)
    model, processor = build_tiny_qwen2_vl(seed=0)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    args = SFTConfig(
        output_dir=str(tmp_path / "out"), max_steps=STEPS, per_device_train_batch_size=BATCH,
        gradient_accumulation_steps=accumulation, learning_rate=1e-2, report_to=[], seed=0, data_seed=0,
        use_cpu=True, bf16=False, fp16=False, gradient_checkpointing=False, logging_steps=1, save_strategy="no",
        dataloader_num_workers=0, disable_tqdm=True,
        # Keep `id` (not a model input) so the collator can count rows by it; TRL's collator ignores it.
        remove_unused_columns=False,
    )
    trainer = SFTTrainer(model=model, args=args, train_dataset=ds, processing_class=processor)

    seen: list[str] = []
    image_tokens: list[int] = []
    collate = trainer.data_collator
    assert type(collate).__name__ == "DataCollatorForVisionLanguageModeling"

    def counting_collator(examples):
        seen.extend(example["id"] for example in examples)
        batch = collate(examples)
        image_tokens.append(int((batch["input_ids"] == model.config.image_token_id).sum()))
        assert batch["pixel_values"].shape[0] == int(batch["image_grid_thw"].prod(dim=-1).sum())
        assert (batch["labels"] != -100).any()
        return batch

    trainer.data_collator = counting_collator
    result = trainer.train()

    assert trainer.state.global_step == STEPS
    assert sorted(seen) == sorted(ds["id"]), "every exported row must reach the collator exactly once"
    assert all(count > 0 for count in image_tokens), image_tokens
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert len(losses) == STEPS and all(math.isfinite(loss) for loss in losses), losses
    assert math.isfinite(result.training_loss)
    changed = [name for name, p in model.named_parameters() if not torch.equal(before[name], p.detach())]
    assert any(name.startswith("model.visual") for name in changed), "the vision tower was not trained"
    assert any("language_model" in name for name in changed), "the decoder was not trained"
