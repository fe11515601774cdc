"""Test-only stages (never part of the product): a source of numbers and a slow, partly failing transform.

``numbers`` lists ``count`` rows; ``square`` squares each, fails every multiple of ``fail_every`` with reason
``divisible``, emits two rows for multiples of ``double_every``, optionally sleeps per row (so a test can kill
it mid-stage) and appends one line per processed row to ``calls_log`` (so a test can count recomputation).
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import datasets
from pydantic import Field

from builder.rows import BatchOutput
from builder.stage import Stage, StageConfig


class NumbersConfig(StageConfig):
    count: int = Field(20, ge=0)


class Numbers(Stage):
    name = "numbers"
    Config = NumbersConfig
    key = "num_id"

    def source_rows(self, config, ctx):
        return datasets.Dataset.from_dict(
            {"num_id": [f"n{i:05d}" for i in range(config.count)], "value": list(range(config.count))}
        )

    def input_key(self, config):
        return "num_id"

    def features(self, config):
        return datasets.Features({"num_id": datasets.Value("string"), "value": datasets.Value("int64")})

    def make_batch_fn(self, config, ctx):
        def fn(batch):
            out = BatchOutput(["num_id", "value"])
            for key, value in zip(batch["num_id"], batch["value"]):
                out.add(key, {"num_id": key, "value": value})
            return out.to_columns()

        return fn


class SquareConfig(StageConfig):
    fail_every: int = 0
    double_every: int = 0
    sleep_s: float = 0.0
    calls_log: str | None = None
    offset: int = 0
    hold_while: str | None = None  # a path: rows from `hold_from` on wait while it exists (pins a run mid-stage)
    hold_from: int = 0
    raise_from: int | None = None  # rows from this value on raise (a stage that stops with an exception)
    hold_rows: list[int] = []  # these rows (values) also wait while `hold_while` exists
    sleep_below: int | None = None  # sleep_s applies only to rows below this value (one slow shard)
    in_flight: int = 1  # Stage.shards_in_flight
    slow_rows: list[int] = []  # sleep_s applies to these rows too
    raise_rows: list[int] = []  # a batch holding one of these rows raises
    # A path to a JSON list of row values the "server" cannot answer (they fail ``api_error``, a reason the
    # stage declares unanswered): change the file between runs to fix the server.
    refused_file: str | None = None


class Square(Stage):
    name = "square"
    Config = SquareConfig
    key = "sq_id"
    upstream = "numbers"
    batch_size = 2
    unanswered_reasons = frozenset({"api_error"})

    def input_key(self, config):
        return "num_id"

    def features(self, config):
        return datasets.Features(
            {"sq_id": datasets.Value("string"), "num_id": datasets.Value("string"), "square": datasets.Value("int64")}
        )

    def shards_in_flight(self, config):
        return config.in_flight

    def make_batch_fn(self, config, ctx):
        def fn(batch):
            out = BatchOutput(["sq_id", "num_id", "square"])
            refused = set(json.loads(Path(config.refused_file).read_text())) if config.refused_file else set()
            for key, value in zip(batch["num_id"], batch["value"]):
                if config.calls_log:
                    with open(config.calls_log, "a") as log:
                        log.write(f"{key}\n")
                        log.flush()
                        os.fsync(log.fileno())
                slow = value in config.slow_rows or (not config.slow_rows and (
                    config.sleep_below is None or value < config.sleep_below))
                if config.sleep_s and slow:
                    time.sleep(config.sleep_s)
                held = (value >= config.hold_from if not config.hold_rows else value in config.hold_rows)
                while config.hold_while and held and os.path.exists(config.hold_while):
                    time.sleep(0.01)
                if value in refused:
                    out.fail(key, "api_error", f"HTTP 404: the server does not serve row {value}")
                    continue
                if config.fail_every and value % config.fail_every == 0:
                    out.fail(key, "divisible", f"{value} is divisible by {config.fail_every}")
                    continue
                copies = 2 if config.double_every and value % config.double_every == 0 else 1
                for copy in range(copies):
                    out.add(key, {"sq_id": f"{key}-{copy}", "num_id": key, "square": value * value + config.offset})
                if copies == 1 and config.double_every:
                    out.fail(key, "single_copy", "only one copy", item="copy-1")
            ctx.add_usage(requests=len(batch["num_id"]))
            if set(config.raise_rows) & set(batch["value"]):
                raise RuntimeError(f"rows {sorted(set(config.raise_rows) & set(batch['value']))} stop the stage.")
            if config.raise_from is not None and max(batch["value"]) >= config.raise_from:
                raise RuntimeError(f"row value {max(batch['value'])} stops the stage (raise_from)")
            return out.to_columns()

        return fn


class ToyFinalConfig(StageConfig):
    suffix: str = ""


class ToyFinal(Stage):
    """Reads ``square`` as its input and ``numbers`` as a side input."""

    name = "toyfinal"
    Config = ToyFinalConfig
    key = "sq_id"
    upstream = "square"
    side_inputs = ("numbers",)

    def input_key(self, config):
        return "sq_id"

    def features(self, config):
        return datasets.Features({"sq_id": datasets.Value("string"), "label": datasets.Value("string")})

    def make_batch_fn(self, config, ctx):
        numbers = ctx.load_stage("numbers")
        values = dict(zip(numbers["num_id"], numbers["value"]))

        def fn(batch):
            out = BatchOutput(["sq_id", "label"])
            for key, num in zip(batch["sq_id"], batch["num_id"]):
                out.add(key, {"sq_id": key, "label": f"{values[num]}{config.suffix}"})
            return out.to_columns()

        return fn


TOY_STAGES = [Numbers(), Square(), ToyFinal()]


def copy_rows(columns, key):
    """A batch function that passes rows through unchanged (for test stages standing in for real ones)."""

    def fn(batch):
        out = BatchOutput(list(columns))
        for i, row_key in enumerate(batch[key]):
            out.add(row_key, {c: batch[c][i] for c in columns})
        return out.to_columns()

    return fn


class ToyImagesConfig(StageConfig):
    folder: str = ""


class ToyImages(Stage):
    """Stands in for the images stage: every file of ``folder`` as a row shaped like the real stage's,
    with the path ``toy/<file>`` under an image root ``toy`` written to ``image_roots.json``."""

    name = "images"
    Config = ToyImagesConfig
    key = "image_id"
    COLUMNS = ("image_id", "path", "width", "height", "format", "source", "url")

    def input_key(self, config):
        return "image_id"

    def source_rows(self, config, ctx):
        from pathlib import Path

        from builder.ids import bytes_id

        rows = [{"image_id": bytes_id(f.read_bytes()), "path": f"toy/{f.name}", "width": 0, "height": 0,
                 "format": f.suffix[1:], "source": "toy", "url": ""} for f in sorted(Path(config.folder).iterdir())]
        return datasets.Dataset.from_list(rows, features=self.features(config))

    def features(self, config):
        v = datasets.Value
        return datasets.Features({"image_id": v("string"), "path": v("string"), "width": v("int32"),
                                  "height": v("int32"), "format": v("string"), "source": v("string"),
                                  "url": v("string")})

    def make_batch_fn(self, config, ctx):
        return copy_rows(self.COLUMNS, "image_id")

    def finalize(self, config, ctx, output):
        from pathlib import Path

        from loaders.images.paths import ROOTS_FILE, write_roots

        write_roots(ctx.stage_dir / ROOTS_FILE, ctx.run_dir, {"toy": Path(config.folder)})


CANDIDATES = ["OCR~Scene text~Street signs", "Counting~Animals", "Charts, tables~Reading values", "Art~Style"]


class ToyMatch(Stage):
    """Stands in for the match stage: every image gets the same four candidates (``CANDIDATES``)."""

    name, Config, key, upstream, batch_size = "match", StageConfig, "image_id", "images", 64

    def input_key(self, config):
        return "image_id"

    def features(self, config):
        candidate = {"task_type": datasets.Value("string"), "task_id": datasets.Value("string"),
                     "score": datasets.Value("float32")}
        return datasets.Features({"image_id": datasets.Value("string"), "candidates": datasets.List(candidate)})

    def make_batch_fn(self, config, ctx):
        def fn(batch):
            rows = {"image_id": batch["image_id"],
                    "candidates": [[{"task_type": c, "task_id": c, "score": 0.5} for c in CANDIDATES]] * len(batch["image_id"])}
            return copy_rows(("image_id", "candidates"), "image_id")(rows)

        return fn
