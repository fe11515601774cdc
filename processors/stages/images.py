"""The ``images`` stage (step 2): collect images from folders, datasets, URL lists, the paper's named sets and
the synthetic demo generator; validate, hash and deduplicate them; keep them by reference.

Input rows are references (``loaders.images.listing``: ``ref, source, kind, locator, url``), frozen by the
runner at the first run. Each batch: fetch bytes (URLs of the batch in one asyncio loop, files and synthetic
images in a thread pool) and validate them with a full decode (``processors.image_validate``). That is all the
expensive work, and it carries no state from one shard to the next, so shards run at once (``parallel_shards``
in this process; Ray workers on any node). Deduplication is the stage's settle step
(``Stage.make_settle_fn``): the runner applies it to each finished shard in input order, in its own process,
through the ledger (``loaders.images.dedup``), so which copy of an image is kept never depends on which shard
finished first — the output is the serial run's, row for row. Every ref leaves as one row or one failure:
``duplicate`` (same bytes as an earlier ref, named in the detail), ``near_duplicate`` (``drop`` mode only),
or a fetch/validation reason code.

Memory: every decode is admitted against ``memory_budget_mb`` with its cost estimated from the header
(``processors.image_validate.decode_cost``), first come first served; one image above the whole budget waits
until nothing else is held and then decodes alone. The pixels held at once thus stay below
max(``memory_budget_mb``, the largest single image ``limits.max_pixels`` lets through), whatever ``workers``
is and whatever the input. The budget only orders the work: rows and verdicts are the same for any budget.

Stopping: Ctrl-C / SIGTERM (a ``KeyboardInterrupt`` in the main thread) drops the batch's queued rows and
releases the decodes waiting for the budget, so the stage stops after at most one image per worker; files
are read only when they are regular files (``loaders.images.paths``), so no worker waits on a FIFO.

The listing's counts (references per source, entries passed over and why: hidden files, hidden or linked
folders, other endings) go to ``stats.json`` in the stage folder, shown by ``taskgalaxy status --json``.

Storage: files of folder and recipe sources stay in place; bytes that came from elsewhere (URLs, datasets,
the generator) are written once under the store folder by content id. A row's ``path`` is
``<root>/<relative path>``; ``loaders.images.paths.resolve_image_path(run_dir, path)`` gives the file.

Example (configs/demo.yaml)::

    images:
      sources:
        - {type: synthetic, count: 48, seed: 0}
"""

from __future__ import annotations

import logging
import os
import shutil
import threading
from collections import deque
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor, wait
from contextlib import contextmanager
from pathlib import Path
from typing import Literal

import datasets
import pyarrow as pa
from pydantic import BaseModel, ConfigDict, Field, model_validator

from builder.config import ConfigPath
from builder.rows import FAILURE_DETAIL, FAILURE_ITEM, FAILURE_REASON, SOURCE, BatchOutput
from builder.runfolder import atomic_write_json
from builder.stage import Stage, StageConfig, StageContext
from loaders.images.dedup import Ledger
from loaders.images.download import DownloadConfig
from loaders.images.download_journal import DOWNLOADS_DIR, DownloadJournal
from loaders.images.fetch import Blob, Fetcher
from loaders.images.listing import COLUMNS as INPUT_COLUMNS
from loaders.images.listing import list_sources_with_report, source_roots
from loaders.images.paths import ROOTS_FILE, STORE_ROOT, row_path, store_relpath, write_roots
from loaders.images.sources import RESERVED_NAMES, SourceConfig
from loaders.images.synthetic import SYNTHETIC_VERSION
from processors.image_validate import (
    VALIDATE_VERSION,
    ImageCheck,
    ImageLimits,
    check_image,
    decode_cost,
    return_freed_pixels_to_os,
)

logger = logging.getLogger(__name__)

STAGE_VERSION = "1"
LEDGER_FILE = "dedup.sqlite"
STATS_FILE = "stats.json"  # the listing report; builder.status shows it as the stage's "stats"
OUTPUT_COLUMNS = (
    "image_id", "path", "width", "height", "format", "mode", "frames", "bytes", "phash", "near_dup_of",
    "source", "ref", "url",
)


class NearDuplicates(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    mode: Literal["off", "report", "drop"] = Field(
        "report", description="report: keep, set near_dup_of; drop: fail with near_duplicate"
    )
    max_distance: int = Field(4, ge=0, le=7, description="dHash bits that may differ (64-bit hash)")


class ImagesConfig(StageConfig):
    sources: tuple[SourceConfig, ...] = Field(min_length=1, description="where images come from, in order")
    store_dir: ConfigPath | None = Field(None, description="where fetched bytes are stored; default <run>/images")
    limits: ImageLimits = ImageLimits()
    download: DownloadConfig = DownloadConfig()
    near_duplicates: NearDuplicates = NearDuplicates()
    workers: int = Field(4, ge=1, le=64, description="threads decoding/reading images")
    # Threads of one process gain nothing on CPU-bound decoding (measured: 2 shards of 1 thread each were no
    # faster than 1); more shards in flight help URL lists, whose downloads wait on the network. Many cores
    # and many nodes: the Ray engine, one process per shard.
    parallel_shards: int = Field(
        1, ge=1, le=64, description="shards this process works on at once (the local engine; under Ray, "
        "run.ray_resources.images.workers processes): more overlap URL downloads; the output is the same")
    memory_budget_mb: int = Field(
        512, ge=16, description="decoded pixels all workers may hold at once (estimated from each header); "
        "larger images wait their turn, one above the budget decodes alone")

    @model_validator(mode="after")
    def _unique_names(self) -> "ImagesConfig":
        names = [s.source_name for s in self.sources]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"source names must be unique, {dupes} repeat; give each source a distinct 'name'")
        reserved = sorted(RESERVED_NAMES & set(names))
        if reserved:
            raise ValueError(f"source name(s) {reserved} are reserved; choose another 'name'")
        return self


def store_dir(config: ImagesConfig, run_dir: Path) -> Path:
    return Path(config.store_dir) if config.store_dir else Path(run_dir) / "images"


class ImagesStage(Stage):
    name = "images"
    description = "the collected, validated, deduplicated images (embedded)"
    Config = ImagesConfig
    key = "image_id"
    upstream = None
    batch_size = 256


    def shards_in_flight(self, config: ImagesConfig) -> int:
        return config.parallel_shards

    def resources(self, config) -> dict:
        # On Ray: fetching and decoding hold no state between shards (the duplicate ledger is the settle step,
        # on the driver), so shards run as tasks on any node at once.
        return {**super().resources(config), "workers": None}

    def input_key(self, config: ImagesConfig) -> str:
        return "ref"

    def features(self, config: ImagesConfig) -> datasets.Features:
        ints = {"width": "int32", "height": "int32", "frames": "int32", "bytes": "int64"}
        return datasets.Features({c: datasets.Value(ints.get(c, "string")) for c in OUTPUT_COLUMNS})

    def fingerprint_config(self, config: ImagesConfig) -> dict:
        # Parallelism only: more threads, connections or memory fetch and check the same images.
        return config.model_dump(mode="json", exclude={"workers": True, "memory_budget_mb": True,
                                                       "parallel_shards": True,
                                                       "download": {"concurrency", "per_host", "user_agent"}})

    def fingerprint_parts(self, config: ImagesConfig) -> dict:
        return {"stage": STAGE_VERSION, "validate": VALIDATE_VERSION, "synthetic": SYNTHETIC_VERSION}

    def source_rows(self, config: ImagesConfig, ctx: StageContext) -> datasets.Dataset:
        columns, report = list_sources_with_report(config.sources, ctx.run_dir, config.download)
        atomic_write_json(ctx.stage_dir / STATS_FILE, {"listing": report})  # what every source gave and passed over
        self._write_roots(config, ctx)
        features = datasets.Features({c: datasets.Value("string") for c in INPUT_COLUMNS})
        return datasets.Dataset.from_dict(columns, features=features)

    def _write_roots(self, config: ImagesConfig, ctx: StageContext) -> None:
        roots = source_roots(config.sources, ctx.run_dir, store_dir(config, ctx.run_dir))
        write_roots(ctx.stage_dir / ROOTS_FILE, ctx.run_dir, roots)

    def make_batch_fn(self, config: ImagesConfig, ctx: StageContext):
        store = store_dir(config, ctx.run_dir)
        roots = source_roots(config.sources, ctx.run_dir, store)
        fetcher = Fetcher({s.source_name: s for s in config.sources}, roots, config.download, config.limits.max_bytes)
        worker = _Worker(fetcher, config.limits, roots, store)
        downloads = DownloadJournal(ctx.stage_dir / DOWNLOADS_DIR, roots[STORE_ROOT])
        # One budget for every shard this process has in flight: the pixels held stay under the bound whatever
        # parallel_shards is.
        budget = DecodeBudget(config.memory_budget_mb * 2**20)
        return_freed_pixels_to_os()  # else each worker thread's heap keeps the largest image it ever decoded

        def batch(columns: dict[str, list]) -> dict[str, list]:
            rows = [dict(zip(columns, values)) for values in zip(*columns.values())]
            out = BatchOutput(OUTPUT_COLUMNS)
            resumed = downloads.stored(rows)
            prefetched = fetcher.prefetch(rows, resumed)
            ctx.add_usage(downloaded_bytes=sum(len(b.data or b"") for r, b in prefetched.items() if r not in resumed))
            results = _run_workers(rows, lambda row: worker.run(row, prefetched, budget), config.workers, budget,
                                   stop=ctx.stop_event())
            downloads.record(rows, {row["ref"]: path for row, (check, path) in zip(rows, results)
                                    if row["kind"] == "url" and check.ok and path.startswith(f"{STORE_ROOT}/")})
            for row, (verdict, path) in zip(rows, results):
                _verdict(out, row, verdict, path)
            return out.to_columns()

        return batch

    def make_settle_fn(self, config: ImagesConfig, ctx: StageContext):
        ledger_path = ctx.stage_dir / LEDGER_FILE
        bands = config.near_duplicates.max_distance + 1

        def settle(table: pa.Table) -> tuple[pa.Table, dict[str, float]]:
            out, near = BatchOutput(OUTPUT_COLUMNS), 0
            with Ledger(ledger_path, bands=bands) as ledger:  # one commit per shard: a prefix in input order
                for row in table.to_pylist():
                    near += _dedup(out, row, ledger, config)
            return pa.Table.from_pydict(out.to_columns(), schema=table.schema), (
                {"near_duplicates": near} if near else {})

        return settle

    def finalize(self, config: ImagesConfig, ctx: StageContext, output: datasets.Dataset) -> None:
        self._write_roots(config, ctx)
        shutil.rmtree(ctx.stage_dir / DOWNLOADS_DIR, ignore_errors=True)  # every shard is committed


STOP_POLL_S = 0.2  # how often a batch waiting on its workers looks at the shard's stop event


def _run_workers(rows: list[dict], work, workers: int, budget: "DecodeBudget",
                 stop: threading.Event | None = None) -> list:
    """``work(row)`` for every row on ``workers`` threads, results in row order.

    On a stop (Ctrl-C/SIGTERM, the stall watchdog, or a crash) the rows not started are dropped and the decodes
    waiting for the budget released: ``with ThreadPoolExecutor`` would instead run the whole rest of the batch
    before letting the stop through. A stop does not wait even for the rows in progress (a read stuck on a hung
    mount never returns; the CLI bounds the wait for those threads). The shard runs on an engine thread, so a
    stop reaches it as ``stop`` (the shard's stop event), looked at every ``STOP_POLL_S``."""
    from builder.engine import ShardStopped

    pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="images-worker")
    try:
        futures = [pool.submit(work, row) for row in rows]
        pending = set(futures)
        while pending:
            _, pending = wait(pending, timeout=STOP_POLL_S if stop is not None else None)
            if pending and stop is not None and stop.is_set():
                raise ShardStopped("the images stage is stopping: rows still being read are left")
        results = [future.result() for future in futures]
    except BaseException as exc:
        budget.close()
        pool.shutdown(wait=isinstance(exc, Exception) and not isinstance(exc, ShardStopped), cancel_futures=True)
        raise
    pool.shutdown()
    return results


class DecodeStopped(Exception):
    """The stage is stopping: a decode that was waiting for the memory budget is not started."""


class DecodeBudget:
    """Bytes of decoded pixels the workers may hold at once, handed out first come, first served.

    A cost above the whole budget is capped to it, so such an image waits until nothing else is held and then
    decodes alone: the total held never exceeds max(budget, the largest single image).
    """

    def __init__(self, total_bytes: int):
        self.total = total_bytes
        self._free = total_bytes
        self._queue: deque[object] = deque()  # tickets of the waiting decodes, oldest first (no starvation)
        self._changed = threading.Condition()
        self._closed = False

    @contextmanager
    def hold(self, cost: int) -> Iterator[None]:
        cost = min(cost, self.total)
        if cost <= 0:  # a check that fails on the header decodes nothing
            yield
            return
        self._acquire(cost)
        try:
            yield
        finally:
            with self._changed:
                self._free += cost
                self._changed.notify_all()

    def _acquire(self, cost: int) -> None:
        ticket = object()
        with self._changed:
            self._queue.append(ticket)
            try:
                while not self._closed and (self._queue[0] is not ticket or self._free < cost):
                    self._changed.wait()
                if self._closed:
                    raise DecodeStopped("the images stage is stopping")
                self._free -= cost
            finally:
                self._queue.remove(ticket)
                self._changed.notify_all()

    def close(self) -> None:
        """Release every waiting decode with ``DecodeStopped`` (the stage is stopping)."""
        with self._changed:
            self._closed = True
            self._changed.notify_all()


class _Worker:
    """Fetch + validate + store one row; runs in worker threads, touches no shared mutable state."""

    def __init__(self, fetcher: Fetcher, limits: ImageLimits, roots: dict[str, Path], store: Path):
        self.fetcher, self.limits, self.roots, self.store = fetcher, limits, roots, store

    def run(self, row: dict, prefetched: dict[str, Blob], budget: DecodeBudget) -> tuple[ImageCheck, str]:
        blob = self.fetcher.read(row, prefetched)
        if blob.reason:
            return ImageCheck(reason=blob.reason, detail=blob.detail), ""
        with budget.hold(decode_cost(blob.data, self.limits)):
            check = check_image(blob.data, self.limits, name=self._label(row))
        if not check.ok:
            return check, ""
        if row["kind"] == "folder":
            return check, row_path(row["source"], row["locator"])
        relative = store_relpath(check.image_id, check.ext)
        _write_once(self.store / relative, blob.data)
        return check, row_path(STORE_ROOT, relative)

    def _label(self, row: dict) -> str:
        if row["kind"] == "folder":
            return str(self.roots[row["source"]] / row["locator"])
        return row["url"] or row["ref"]


def _write_once(dest: Path, data: bytes) -> None:
    """Content-addressed write: skip if present, else temp file + rename (never a half-written image)."""
    if dest.is_file():  # a FIFO planted under the name is replaced by the rename, never opened
        return
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".tmp-{dest.name}-{os.getpid()}-{threading.get_ident()}")
    tmp.write_bytes(data)
    os.replace(tmp, dest)


def _verdict(out: BatchOutput, row: dict, check: ImageCheck, path: str) -> None:
    """One fetched and checked ref as a raw row (``near_dup_of`` left for the settle step) or a failure."""
    ref = row["ref"]
    if not check.ok:
        out.fail(ref, check.reason, check.detail)
        return
    out.add(ref, {
        "image_id": check.image_id, "path": path, "width": check.width, "height": check.height,
        "format": check.format, "mode": check.mode, "frames": check.frames, "bytes": check.size,
        "phash": f"{check.phash:016x}", "near_dup_of": None, "source": row["source"], "ref": ref,
        "url": row["url"],
    })


def _dedup(out: BatchOutput, row: dict, ledger: Ledger, config: ImagesConfig) -> int:
    """Pass one raw row through the ledger (called in input order); returns 1 for a near-duplicate."""
    ref = row[SOURCE]
    if row[FAILURE_REASON] is not None:
        out.fail(ref, row[FAILURE_REASON], row[FAILURE_DETAIL] or "", item=row[FAILURE_ITEM])
        return 0
    kept = {column: row[column] for column in OUTPUT_COLUMNS}
    first = ledger.claim(kept["image_id"], ref, kept["path"])
    if first != ref:
        out.fail(ref, "duplicate",
                 f"{ref} has the same bytes as {first} (image_id {kept['image_id']}); kept the first")
        return 0
    if config.near_duplicates.mode == "off":
        out.add(ref, kept)
        return 0
    near_of, distance = ledger.near(kept["image_id"], int(kept["phash"], 16), config.near_duplicates.max_distance)
    if near_of is not None and config.near_duplicates.mode == "drop":
        out.fail(ref, "near_duplicate", f"{ref} is {distance} dHash bits from {ledger.first_ref(near_of)}")
        return 1
    out.add(ref, {**kept, "near_dup_of": near_of})
    return int(near_of is not None)
