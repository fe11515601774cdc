"""The object a match stage holds: a lazily loaded CLIP, the embedded task types, and the image loop.

One ``ClipMatcher`` per (config, cache folder) is enough for a whole run: the model is loaded on first use
and shared through ``processors.clip.models``' cache, and the text bank stays on the device until the task
list changes.
"""

from __future__ import annotations

import atexit
import itertools
import logging
import os
import weakref
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from processors.clip.config import ClipMatchConfig
from processors.clip.images import (
    WORKER_BATCH,
    collate,
    ImageBatch,
    ImageError,
    ImageFiles,
    PathBatches,
    SplitPreprocess,
    join_batches,
    make_loader,
    split_preprocess,
    start_decode_server,
)
from processors.clip.models import LoadedClip, load_clip
from processors.clip.text import TextBank, leaf_mask, load_or_embed, normalize_rows
from processors.clip.topk import topk_cosine

if TYPE_CHECKING:
    import torch

logger = logging.getLogger(__name__)

Candidates = list[dict[str, Any]]  # [{"task_type": path, "task_id": id, "score": float}], best first


def default_batch_size(device: "torch.device") -> int:
    # CPU: 16 measured ~5 % faster per image than 32 for ViT-B-32 on a 2-core Xeon (activations stay in
    # cache); beyond 32 it only gets slower. GPU: large batches keep the device busy.
    return 256 if device.type == "cuda" else 16


def default_num_workers(device: "torch.device") -> int:
    """GPU: every core but one decodes. CPU: one worker, the model's threads need the other cores."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    if device.type == "cuda":
        return max(1, min(16, cores - 1))
    return 1 if cores >= 2 else 0


class ClipMatcher:
    def __init__(self, config: ClipMatchConfig, cache_dir: Path, *, compile_backend: str | Callable = "inductor"):
        self.config = config
        self.cache_dir = Path(cache_dir)
        self._clip: LoadedClip | None = None
        self._bank: TextBank | None = None
        self._bank_on_device: "torch.Tensor | None" = None
        self._split: SplitPreprocess | None = None
        self._loader: tuple[Any, PathBatches] | None = None  # built on first use, its workers persist
        self._pass_open = False
        _OPEN_MATCHERS.add(self)
        self._compile_backend = compile_backend  # tests use "eager" (dynamo without inductor: fast on a CPU)
        self._compiled: Callable | None = None
        self._compile_state = "unset"  # unset -> trying -> on | off
        # The next pass's first images, decoded ahead (``prefetch``): (their paths, the future of their batches).
        self._prefetched: tuple[tuple[str, ...], "concurrent.futures.Future"] | None = None
        self._prefetch_pool: "tuple[concurrent.futures.ThreadPoolExecutor, ...] | None" = None

    @property
    def clip(self) -> LoadedClip:
        """The model, loaded on first use (so a matcher pickles and constructs cheaply)."""
        if self._clip is None:
            c = self.config
            if c.num_workers != 0:  # the decode workers' server imports torch meanwhile (images.decode_context)
                start_decode_server()
            self._clip = load_clip(c.model, c.pretrained, c.device, c.precision)
            self._split = split_preprocess(self._clip.preprocess)
        return self._clip

    def select_tasks(self, task_ids: Sequence[str], paths: Sequence[str]) -> tuple[list[str], list[str]]:
        """The task types to match against, per ``config.task_types``, in taxonomy order."""
        if self.config.task_types == "all":
            return list(task_ids), list(paths)
        keep = leaf_mask(paths)
        return [t for t, k in zip(task_ids, keep) if k], [p for p, k in zip(paths, keep) if k]

    def set_tasks(self, task_ids: Sequence[str], paths: Sequence[str]) -> TextBank:
        """Embed (or read from the cache) these task types and keep them on the device."""
        bank = load_or_embed(self.clip, task_ids, paths, self.cache_dir, self.config.text_batch_size, self._bank)
        if bank is not self._bank:
            import torch

            self._bank = bank
            self._bank_on_device = torch.from_numpy(bank.vectors).to(self.clip.device)
        return self._bank

    @property
    def batch_size(self) -> int:
        return self.config.batch_size or default_batch_size(self.clip.device)

    @property
    def compiled(self) -> bool:
        """Whether the image tower runs through ``torch.compile`` (decided on the first batch)."""
        return self._compile_state == "on"

    def encode_images(self, pixels: "torch.Tensor") -> "torch.Tensor":
        """[n, 3, H, W] pixels (uint8 from the split transform, or preprocessed floats) -> [n, dim] float32
        unit vectors on the device."""
        import torch

        clip = self.clip
        with torch.inference_mode():
            pixels = pixels.to(clip.device, non_blocking=True)
            if pixels.dtype == torch.uint8:
                pixels = self._split.normalize(pixels)
            with clip.autocast():
                features = self._encode(pixels)
            return normalize_rows(features)

    def _encode(self, pixels: "torch.Tensor") -> "torch.Tensor":
        """The image tower, compiled when the config says so (measured 1.66x on an H100 for ViT-L/14).

        A compiled graph is specialised to one batch shape, so a short last batch is padded to the batch size
        (one shape, one compile per process) and a larger one runs eager. If compiling fails (no C compiler,
        an unsupported op) the run goes on eager, once, with a warning.
        """
        import torch

        model, size, count = self.clip.model, self.batch_size, pixels.shape[0]
        if self._compile_state == "unset":
            self._compile_state = "trying" if self._wants_compile() else "off"
            if self._compile_state == "trying":
                self._compiled = torch.compile(model.encode_image, dynamic=False, backend=self._compile_backend)
        if self._compile_state == "off" or count > size:
            return model.encode_image(pixels)
        if count < size:
            pixels = torch.cat([pixels, pixels.new_zeros((size - count, *pixels.shape[1:]))])
        if self._compile_state == "on":
            return self._compiled(pixels)[:count]
        try:
            logger.info("compiling the CLIP image tower for batches of %d (~25 s on a GPU, once)", size)
            features = self._compiled(pixels)[:count]
        except Exception as exc:  # noqa: BLE001 - any compiler failure: eager still gives the same answer
            logger.warning("torch.compile of the CLIP image tower failed (%s: %s); running eager. Set "
                           "stages.match.compile: false to skip trying.", type(exc).__name__,
                           str(exc).splitlines()[0][:300] if str(exc) else "")
            self._compile_state, self._compiled = "off", None
            return model.encode_image(pixels[:count])
        self._compile_state = "on"
        return features

    def _wants_compile(self) -> bool:
        if self.config.compile == "auto":
            return self.clip.device.type == "cuda"
        return bool(self.config.compile)

    def close(self) -> None:
        """Stop the decode workers (and the prefetch threads) now (a later pass starts new ones). Persistent DataLoader workers left to
        interpreter shutdown can hang the exit (seen on a GPU machine with pinned memory), so every matcher
        still open at exit is closed by an ``atexit`` hook too."""
        self._prefetched = None
        if self._prefetch_pool is not None:
            for pool in self._prefetch_pool:
                pool.shutdown(wait=False, cancel_futures=True)
            self._prefetch_pool = None
        loader, self._loader = self._loader, None
        iterator = getattr(loader[0], "_iterator", None) if loader is not None else None
        if iterator is not None and hasattr(iterator, "_shutdown_workers"):
            iterator._shutdown_workers()

    def prefetch(self, image_paths: Sequence[str | Path]) -> None:
        """Decode the first model batch of the *next* pass now, in the background, while this pass computes:
        a new pass otherwise starts with the device idle until its decode workers deliver the first images
        (the shard-boundary fill, 18 % of a 2,000-image shard's time on an H100). ``iter_batches`` uses it when
        it is given the same paths, and drops it otherwise."""
        import concurrent.futures

        paths = tuple(str(p) for p in image_paths[:self.batch_size])
        if not paths:
            return
        if self._prefetch_pool is None:  # one thread runs the job, its decodes go to the others
            self._prefetch_pool = (
                concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="clip-prefetch"),
                concurrent.futures.ThreadPoolExecutor(PREFETCH_THREADS, thread_name_prefix="clip-prefetch-decode"))
        (runner, pool), dataset = self._prefetch_pool, self._head_dataset()
        pin = self.clip.device.type == "cuda"

        def decode_head() -> list[ImageBatch]:
            items = list(pool.map(dataset.__getitem__, enumerate(paths), chunksize=8))
            heads = [collate(items[start:start + WORKER_BATCH]) for start in range(0, len(items), WORKER_BATCH)]
            return [head.pin_memory() for head in heads] if pin else heads

        self._prefetched = (paths, runner.submit(decode_head))

    def _head_dataset(self) -> ImageFiles:
        clip, c = self.clip, self.config
        return ImageFiles(self._split or clip.preprocess, min_side=clip.input_side if c.fast_decode else None,
                          guard_aspect=clip.resize_mode == "shortest")

    def _take_prefetched(self, paths: list[str]) -> list[ImageBatch]:
        """The prefetched first batches if they are this pass's first images, else nothing (and they go)."""
        prefetched, self._prefetched = self._prefetched, None
        if prefetched is None:
            return []
        head, future = prefetched
        if tuple(paths[:len(head)]) != head:
            future.cancel()
            return []
        try:
            return future.result()
        except Exception:  # noqa: BLE001 - the loader decodes them again (and reports what is wrong with them)
            logger.debug("prefetching the next shard's first images failed", exc_info=True)
            return []

    def iter_batches(self, image_paths: Sequence[str | Path], on_batch: Callable[[], None] | None = None
                     ) -> Iterator[ImageBatch]:
        """The data path alone: model-sized batches of pixels (on the device) and per-position errors.
        ``on_batch()`` is called as each batch is ready (a sign of life: the engine's stall watchdog).

        One pass at a time per matcher: the loader and its workers are shared by every pass, so a second pass
        started before the first is finished or closed would take over the first one's stream.
        """
        if self._pass_open:
            raise RuntimeError("ClipMatcher: a match/iter_batches pass is still open on this matcher; finish "
                               "or close() it first (one matcher streams one pass at a time)")
        loader, sampler = self._get_loader()
        paths = [str(p) for p in image_paths]
        head = self._take_prefetched(paths)
        done = sum(len(b.indices) + len(b.errors) for b in head)  # the head's images, readable or not
        sampler.set_paths(paths[done:])
        self._pass_open = True
        try:
            small = itertools.chain(head, _shifted(loader, done) if done < len(paths) else ())
            if sampler.batch_size < self.batch_size or head:
                small = join_batches(small, self.batch_size, self.clip.device)
            while True:
                try:
                    batch = next(small)
                except StopIteration:
                    return
                except Exception as exc:
                    # e.g. a worker killed by the OOM killer or a decoder crash: persistent workers do not recover
                    # from that (every later pass waits for the dead one), so the next pass starts fresh ones.
                    logger.warning("CLIP image loading failed (%s: %s); the next pass starts new decode workers",
                                   type(exc).__name__, exc)
                    self._loader = None
                    raise
                if on_batch is not None:
                    on_batch()  # may raise (a stopped shard): not a loading failure, the workers are fine
                yield batch
        finally:
            self._pass_open = False

    def _get_loader(self) -> tuple[Any, PathBatches]:
        if self._loader is not None and not _workers_alive(self._loader[0]):
            logger.warning("a CLIP decode worker died between passes (killed? out of memory?); starting new ones")
            self._loader = None
        if self._loader is None:
            clip, batch_size, c = self.clip, self.batch_size, self.config
            workers = c.num_workers if c.num_workers is not None else default_num_workers(clip.device)
            dataset = ImageFiles(self._split or clip.preprocess,
                                 min_side=clip.input_side if c.fast_decode else None,
                                 guard_aspect=clip.resize_mode == "shortest")
            # uint8 from the split transform, float32 from a plain one: what one image costs in shared memory.
            sample_bytes = 3 * clip.input_side**2 * (1 if self._split is not None else 4)
            self._loader = make_loader(dataset, batch_size=min(batch_size, WORKER_BATCH), num_workers=workers,
                                       pin_memory=clip.device.type == "cuda", sample_bytes=sample_bytes)
        return self._loader

    def match(self, image_paths: Sequence[str | Path], on_batch: Callable[[], None] | None = None
              ) -> Iterator[tuple[int, "Candidates | ImageError"]]:
        """For every image (by position in ``image_paths``): its top-k candidates, or why it has none.
        ``on_batch()`` is called once per model batch (see ``iter_batches``).

        Results come batch by batch in input order, except that unreadable images come first in their batch.
        """
        import torch

        if self._bank is None:
            raise RuntimeError("call set_tasks() before match()")
        c = self.config
        # One batch in flight: batch n+1's encode is queued on the GPU before batch n's top-k is read back, so
        # the device never waits for the host to build candidates or fetch the next batch (on the CPU the
        # copy is synchronous and this is the plain loop).
        pending: tuple[list[int], _HostTopk] | None = None
        for batch in self.iter_batches(image_paths, on_batch):
            ready = None
            if batch.pixels is not None:
                with torch.inference_mode():
                    scores, index = topk_cosine(self.encode_images(batch.pixels), self._bank_on_device, c.top_k,
                                                c.score_chunk)
                    ready = _HostTopk.start(scores, index)
            if pending is not None:
                yield from zip(pending[0], self._candidates(*pending[1].wait()), strict=True)
            yield from batch.errors.items()
            pending = (batch.indices, ready) if ready is not None else None
        if pending is not None:
            yield from zip(pending[0], self._candidates(*pending[1].wait()), strict=True)

    def _candidates(self, scores, index) -> Iterator[Candidates]:
        bank = self._bank
        for row_scores, row_index in zip(scores, index, strict=True):
            yield [
                {"task_type": bank.paths[j], "task_id": bank.task_ids[j], "score": float(s)}
                for s, j in zip(row_scores, row_index)
            ]


PREFETCH_THREADS = max(1, min(4, (os.cpu_count() or 2) // 2))  # decode threads of the next pass's head


def _shifted(batches: Iterator[ImageBatch], offset: int) -> Iterator[ImageBatch]:
    """The loader's batches of ``paths[offset:]`` with positions in the whole pass."""
    for batch in batches:
        yield ImageBatch([i + offset for i in batch.indices], batch.pixels,
                         {i + offset: error for i, error in batch.errors.items()})


_OPEN_MATCHERS: "weakref.WeakSet[ClipMatcher]" = weakref.WeakSet()


@atexit.register
def _close_open_matchers() -> None:
    for matcher in list(_OPEN_MATCHERS):
        matcher.close()


def _workers_alive(loader: Any) -> bool:
    """False when a persistent worker of ``loader`` has died (a new pass would wait for it, then fail). Reads
    DataLoader internals; if they are not there, reports alive and a dead worker fails the pass instead."""
    workers = getattr(getattr(loader, "_iterator", None), "_workers", None) or []
    return all(worker.is_alive() for worker in workers)


class _HostTopk:
    """A top-k result on its way to host memory: on CUDA an asynchronous copy into pinned buffers plus an
    event, so waiting for it does not also wait for work queued after it."""

    def __init__(self, scores, index, event=None):
        self.scores, self.index, self.event = scores, index, event

    @classmethod
    def start(cls, scores: "torch.Tensor", index: "torch.Tensor") -> "_HostTopk":
        import torch

        if scores.device.type != "cuda":
            return cls(scores.cpu().numpy(), index.cpu().numpy())
        host_scores = torch.empty(scores.shape, dtype=scores.dtype, pin_memory=True)
        host_index = torch.empty(index.shape, dtype=index.dtype, pin_memory=True)
        host_scores.copy_(scores, non_blocking=True)
        host_index.copy_(index, non_blocking=True)
        event = torch.cuda.Event()
        event.record(torch.cuda.current_stream(scores.device))  # the copies' stream (cuda:N, not cuda:0)
        return cls(host_scores, host_index, event)

    def wait(self):
        """(scores, index) as numpy arrays, once the copy has landed."""
        if self.event is None:
            return self.scores, self.index
        self.event.synchronize()
        return self.scores.numpy(), self.index.numpy()
