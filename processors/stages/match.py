"""Step 3a, ``match``: every image gets its top-k task types by CLIP cosine similarity (no threshold).

Input rows are the ``images`` stage's; the task types come from the ``taxonomy`` stage (a side input, so a
changed taxonomy re-runs this stage). The whole shard goes to one batch-function call (``batch_size=None``)
so one DataLoader streams it. An unreadable image fails its row only (``image_missing``, ``image_corrupt``,
``image_too_large``); every other row gets ``candidates`` sorted by score, best first.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING

from builder.engine import ShardStopped
from builder.outputs import column_values
from builder.rows import BatchOutput
from builder.stage import BatchFn, Stage, StageContext
from processors.clip.config import ClipMatchConfig
from processors.clip.shared import get_matcher, release_matchers

if TYPE_CHECKING:
    import datasets

logger = logging.getLogger(__name__)

# Bump when the way candidates are computed changes (the text template has its own version).
MATCH_VERSION = "1"
COLUMNS = ("image_id", "candidates")

class MatchStage(Stage):
    name = "match"
    description = "each image's top-k task types by CLIP similarity"
    Config = ClipMatchConfig
    key = "image_id"
    upstream = "images"
    side_inputs = ("taxonomy",)
    batch_size = None

    def input_key(self, config: ClipMatchConfig) -> str:
        return "image_id"

    def features(self, config: ClipMatchConfig) -> "datasets.Features":
        import datasets

        candidate = {
            "task_type": datasets.Value("string"),
            "task_id": datasets.Value("string"),
            "score": datasets.Value("float32"),
        }
        return datasets.Features({"image_id": datasets.Value("string"), "candidates": datasets.List(candidate)})

    def fingerprint_config(self, config: ClipMatchConfig) -> dict:
        # Speed knobs only: the same images and task types give the same candidates whatever their values.
        # The coverage pass's keys count only when it is on, so runs without it keep their fingerprints.
        speed = {"batch_size", "num_workers", "text_batch_size", "score_chunk", "compile"}
        off = {"coverage_min", "coverage_max_extra"} if not config.coverage_min else set()
        return config.model_dump(mode="json", exclude=speed | off)

    def fingerprint_parts(self, config: ClipMatchConfig) -> dict:
        from processors.clip.text import TEXT_TEMPLATE_VERSION

        return {"match_version": MATCH_VERSION, "text_template": TEXT_TEMPLATE_VERSION}

    def close(self, config: ClipMatchConfig) -> None:
        release_matchers()

    def resources(self, config: ClipMatchConfig) -> dict:
        # One CLIP model per actor, on a GPU when the cluster has one (device auto falls back to the CPU, as
        # it does locally); run.ray_resources.match.num_gpus: 0.5 puts two actors on each GPU.
        return {"kind": "gpu", "num_cpus": 1, "num_gpus": 0 if config.device in ("cpu", "mps") else 1,
                "workers": None, "runtime_env": None, "gpu_optional": config.device == "auto"}

    def make_batch_fn(self, config: ClipMatchConfig, ctx: StageContext) -> BatchFn:
        from loaders.images.paths import PathEscapeError, load_roots, resolve_image_path

        matcher = get_matcher(config, ctx.cache_dir)
        roots = load_roots(ctx.run_dir)
        taxonomy = ctx.load_stage("taxonomy")
        tasks = matcher.select_tasks(column_values(taxonomy, "task_id"), column_values(taxonomy, "path"))
        if config.top_k > len(tasks[0]):
            logger.warning("match: top_k %d is more than the %d task types to match against; each image gets all "
                           "%d as candidates", config.top_k, len(tasks[0]), len(tasks[0]))

        if config.coverage_min:
            return self._coverage_batch_fn(config, ctx, matcher, tasks, roots)

        def fn(batch: dict[str, list]) -> dict[str, list]:
            matcher.set_tasks(*tasks)  # loads the model and embeds the texts on first use; then a cache hit
            ids = batch["image_id"]
            out = BatchOutput(COLUMNS)
            paths, positions = [], []
            for index, row_path in enumerate(batch["path"]):
                try:
                    paths.append(resolve_image_path(ctx.run_dir, row_path, roots))
                    positions.append(index)
                except PathEscapeError as exc:
                    out.fail(ids[index], "path_escape", str(exc))
            encoded = 0
            stop = ctx.stop_event()

            def on_batch() -> None:  # per model batch: a sign of life, and where a stopped shard stops
                ctx.beat()
                if stop is not None and stop.is_set():
                    raise ShardStopped("match: the shard was told to stop (Ctrl-C, or the stall watchdog)")

            for position, result in matcher.match(paths, on_batch):
                index = positions[position]
                if isinstance(result, list):
                    out.add(ids[index], {"image_id": ids[index], "candidates": result})
                    encoded += 1
                else:
                    out.fail(ids[index], result.reason, result.detail)
            ctx.add_usage(clip_images=encoded)
            return out.to_columns()

        def prefetch(rows) -> None:
            """The engine's hint with the next shard's rows: its first images decode while this one computes."""
            paths = []
            for row_path in column_values(rows, "path"):
                try:
                    paths.append(resolve_image_path(ctx.run_dir, row_path, roots))
                except PathEscapeError:
                    continue  # fails its row when the shard runs, as above
            matcher.prefetch(paths)

        fn.prefetch = prefetch
        return fn

    def _coverage_batch_fn(self, config: ClipMatchConfig, ctx: StageContext, matcher, tasks, roots) -> BatchFn:
        """With the coverage pass on: every image is embedded and planned here, once; a shard looks its rows up."""
        import json

        from builder.runfolder import atomic_write_bytes
        from loaders.images.paths import PathEscapeError, resolve_image_path
        from processors.clip.coverage import embed_images, plan_coverage

        images = ctx.load_stage("images")
        ids, stored = column_values(images, "image_id"), column_values(images, "path")
        escaped, usable_ids, paths = {}, [], []
        for image_id, row_path in zip(ids, stored):
            try:
                paths.append(resolve_image_path(ctx.run_dir, row_path, roots))
                usable_ids.append(image_id)
            except PathEscapeError as exc:
                escaped[image_id] = str(exc)
        bank = matcher.set_tasks(*tasks)
        vectors, errors = embed_images(matcher, usable_ids, paths, Path(ctx.stage_dir) / "coverage" / "embeddings.npz")
        plan = plan_coverage(usable_ids, vectors, errors, bank, top_k=config.top_k, minimum=config.coverage_min,
                             max_extra=config.coverage_max_extra, chunk=min(config.score_chunk, 4096),
                             device=matcher.clip.device)
        stats = {"coverage_pass": {"min": config.coverage_min, "added": plan.added, "leaves_raised": plan.leaves_raised,
                                   "leaves_short": len(plan.leaves_short), "short_examples": plan.leaves_short[:10]}}
        atomic_write_bytes(Path(ctx.stage_dir) / "stats.json", json.dumps(stats, indent=1).encode())

        def fn(batch: dict[str, list]) -> dict[str, list]:
            out = BatchOutput(COLUMNS)
            for image_id in batch["image_id"]:
                if image_id in escaped:
                    out.fail(image_id, "path_escape", escaped[image_id])
                elif image_id in plan.errors:
                    out.fail(image_id, plan.errors[image_id].reason, plan.errors[image_id].detail)
                else:
                    out.add(image_id, {"image_id": image_id, "candidates": plan.candidates[image_id]})
            ctx.add_usage(clip_images=sum(1 for i in batch["image_id"] if i in plan.candidates))
            return out.to_columns()

        return fn
