"""Images in, CLIP-ready tensors out: a DataLoader whose worker processes decode and preprocess.

Every image is opened with ``processors.imageio.open_rgb`` (the one way all steps read pixels). A file that
cannot be read does not fail its batch: the worker returns an ``ImageError`` in its place and the collate
function carries it beside the stacked tensors, so the caller fails that row only.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from PIL import Image

from processors.imageio import ImageTooLargeError, open_rgb

if TYPE_CHECKING:
    import torch

logger = logging.getLogger(__name__)

# Centre-cropping the original to this aspect ratio before "resize short side + centre crop" leaves the
# result unchanged (the crop keeps far more than the final square and its resampling margin) but bounds the
# intermediate image: a 1x20000 strip would otherwise be resized to 224x4,480,000 pixels.
MAX_ASPECT = 3.0


@dataclass(frozen=True)
class ImageError:
    """Why one image has no tensor: a failure reason code and a short detail."""

    reason: str  # image_missing | image_too_large | image_corrupt
    detail: str


@dataclass
class ImageBatch:
    """What the collate function returns: tensors for the good images, errors for the others.

    ``indices[i]`` is the position (in the list given to ``make_loader``) of ``pixels[i]``; ``errors`` maps
    positions of unreadable images to why.
    """

    indices: list[int]
    pixels: "torch.Tensor | None"
    errors: dict[int, ImageError] = field(default_factory=dict)

    def pin_memory(self) -> "ImageBatch":
        """Called by the DataLoader's pin-memory thread (GPU only) so host-to-device copies can overlap."""
        if self.pixels is not None:
            self.pixels = self.pixels.pin_memory()
        return self


def crop_extreme_aspect(image: Image.Image, max_aspect: float = MAX_ASPECT) -> Image.Image:
    """Centre crop so that long side <= ``max_aspect`` x short side; other images are returned as they are."""
    width, height = image.size
    short = min(width, height)
    limit = max(1, int(short * max_aspect))
    if max(width, height) <= limit:
        return image
    if width > height:
        left = (width - limit) // 2
        return image.crop((left, 0, left + limit, height))
    top = (height - limit) // 2
    return image.crop((0, top, width, top + limit))


def classify_error(exc: BaseException) -> ImageError:
    """Map an exception from opening/decoding an image to a failure reason code."""
    if isinstance(exc, FileNotFoundError):
        return ImageError("image_missing", f"no such file: {exc.filename}")
    if isinstance(exc, (ImageTooLargeError, Image.DecompressionBombError)):
        return ImageError("image_too_large", str(exc))
    return ImageError("image_corrupt", f"{type(exc).__name__}: {exc}")


# What decoding a hostile or broken file can raise in PIL (SyntaxError: some broken PNG/GIF headers).
DECODE_ERRORS = (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError)


@dataclass(frozen=True)
class SplitPreprocess:
    """open_clip's eval transform cut in two: geometry (resize, crop) on PIL in the workers, and the
    to-float + normalise tail done on the device. Workers then ship uint8 tensors, 4x fewer bytes through
    shared memory and pinned copies than float32, and the arithmetic is the same as ``ToTensor`` +
    ``Normalize`` (x / 255, then (x - mean) / std, in float32)."""

    geometry: Callable  # PIL image -> PIL image
    mean: tuple[float, ...]
    std: tuple[float, ...]

    def to_uint8(self, image: Image.Image) -> "torch.Tensor":
        import numpy as np
        import torch

        return torch.from_numpy(np.asarray(self.geometry(image), dtype=np.uint8).copy()).permute(2, 0, 1)

    def normalize(self, pixels: "torch.Tensor") -> "torch.Tensor":
        """uint8 [n, 3, H, W] (on any device) -> the float32 tensor the full transform would have made."""
        import torch

        mean = torch.tensor(self.mean, dtype=torch.float32, device=pixels.device).view(1, -1, 1, 1)
        std = torch.tensor(self.std, dtype=torch.float32, device=pixels.device).view(1, -1, 1, 1)
        return pixels.to(torch.float32).div_(255).sub_(mean).div_(std)


def split_preprocess(preprocess: Callable) -> SplitPreprocess | None:
    """Split a ``Compose([...geometry, ToTensor, Normalize])``; None when the transform is shaped otherwise."""
    from torchvision import transforms as T

    steps = list(getattr(preprocess, "transforms", ()))
    if len(steps) < 3 or not isinstance(steps[-1], T.Normalize) or not isinstance(steps[-2], T.ToTensor):
        return None
    normalize = steps[-1]
    return SplitPreprocess(T.Compose(steps[:-2]), tuple(normalize.mean), tuple(normalize.std))


class ImageFiles:
    """A map-style dataset keyed by ``(position, path)``: key -> (position, CHW tensor or ImageError).

    Keyed by path rather than by index so that one loader, with its worker processes, serves every call:
    the paths travel with the keys its ``PathBatches`` sampler hands out, and workers hold no list.

    With a ``SplitPreprocess`` the tensors are uint8 (normalise them with its ``normalize``), with a plain
    transform whatever it returns. ``guard_aspect`` applies ``crop_extreme_aspect`` first; only correct for
    preprocessors that resize the short side and centre-crop a square (open_clip's default "shortest" mode).
    """

    def __init__(self, preprocess: "Callable | SplitPreprocess", *, min_side: int | None = None,
                 guard_aspect: bool = True):
        register_decoders()  # here, before a prefetch thread or a decode worker opens the first image
        self.preprocess = preprocess.to_uint8 if isinstance(preprocess, SplitPreprocess) else preprocess
        self.min_side = min_side
        self.guard_aspect = guard_aspect

    def __getitem__(self, key: tuple[int, str]) -> tuple[int, Any]:
        position, path = key
        try:
            image = open_rgb(path, min_side=self.min_side)
            if self.guard_aspect:
                image = crop_extreme_aspect(image)
            return position, self.preprocess(image)
        except DECODE_ERRORS as exc:
            return position, classify_error(exc)


class PathBatches:
    """The loader's batch sampler: the current pass's ``(position, path)`` keys in batches of ``batch_size``.

    ``set_paths`` before each pass; with persistent workers the loader then reuses its processes instead of
    forking new ones for every shard (15 forks of a process holding a CUDA context cost ~0.5 s a shard).
    """

    def __init__(self, batch_size: int):
        self.batch_size = batch_size
        self.paths: list[str] = []

    def set_paths(self, paths: Sequence[str | Path]) -> None:
        self.paths = [str(p) for p in paths]

    def __iter__(self) -> Iterator[list[tuple[int, str]]]:
        paths, size = self.paths, self.batch_size
        for start in range(0, len(paths), size):
            yield [(i, paths[i]) for i in range(start, min(start + size, len(paths)))]

    def __len__(self) -> int:
        return (len(self.paths) + self.batch_size - 1) // self.batch_size


def collate(items: list[tuple[int, Any]]) -> ImageBatch:
    """Stack the tensors of the readable images; keep the errors of the others by position."""
    import torch

    good = [(i, x) for i, x in items if not isinstance(x, ImageError)]
    errors = {i: x for i, x in items if isinstance(x, ImageError)}
    pixels = torch.stack([x for _, x in good]) if good else None
    return ImageBatch([i for i, _ in good], pixels, errors)


# Images per worker item. Workers hand over small batches that the main process joins on the device into
# model-sized ones: the first model batch is ready after 32 decodes, not 256.
WORKER_BATCH = 32


def join_batches(batches: Iterable[ImageBatch], size: int, device: "torch.device | str") -> Iterator[ImageBatch]:
    """Regroup the loader's small batches into batches of exactly ``size`` readable images (the last may be
    smaller), their pixels moved to ``device`` as each small batch arrives (non-blocking from pinned memory)
    and joined there. Exactly, because a compiled image tower takes one batch shape: a batch that grew past
    it with every unreadable image would run eager.

    Errors ride with the batch whose small batch brought them.
    """
    import torch

    indices: list[int] = []
    parts: list[torch.Tensor] = []
    errors: dict[int, ImageError] = {}

    def take(count: int) -> ImageBatch:
        pixels = (parts[0] if len(parts) == 1 else torch.cat(parts)) if parts else None
        batch = ImageBatch(indices[:count], None if pixels is None else pixels[:count], dict(errors))
        rest = None if pixels is None or pixels.shape[0] == count else pixels[count:]
        del indices[:count]
        parts[:] = [rest] if rest is not None else []
        errors.clear()
        return batch

    for small in batches:
        errors.update(small.errors)
        if small.pixels is not None:
            indices.extend(small.indices)
            parts.append(small.pixels.to(device, non_blocking=True))
        while len(indices) >= size:
            yield take(size)
    if indices or errors:
        yield take(len(indices))


SHM_PATH = "/dev/shm"


def shm_free_bytes(path: str = SHM_PATH) -> int | None:
    """Free bytes of the shared-memory filesystem DataLoader workers pass batches through (None: unknown)."""
    try:
        stats = os.statvfs(path)
    except OSError:
        return None
    return stats.f_bavail * stats.f_frsize


def fit_workers_to_shm(num_workers: int, prefetch_factor: int, batch_bytes: int,
                       shm_free: int | None) -> tuple[int, int]:
    """(workers, prefetch) whose batches in flight fit in half the free shared memory.

    Each worker holds up to ``prefetch_factor`` finished batches in /dev/shm. Docker gives containers 64 MB
    by default, where 15 workers x 4 batches of 256 images (38 MB each) die with a bus error mid-run; this
    lowers the prefetch first, then the workers, and says how to get the full speed back.
    """
    if num_workers == 0 or shm_free is None or batch_bytes <= 0:
        return num_workers, prefetch_factor
    budget = shm_free // 2
    workers, prefetch = num_workers, prefetch_factor
    while workers * prefetch * batch_bytes > budget and prefetch > 1:
        prefetch -= 1
    while workers * prefetch * batch_bytes > budget and workers > 1:
        workers -= 1
    if (workers, prefetch) != (num_workers, prefetch_factor):
        logger.warning(
            "%s has %d MiB free, too little for %d decode workers x %d batches of %d MiB in flight: using %d "
            "worker(s) x %d. Give the container more shared memory for full speed (docker run --shm-size=8g, "
            "or --ipc=host).", SHM_PATH, shm_free >> 20, num_workers, prefetch_factor, batch_bytes >> 20,
            workers, prefetch)
    return workers, prefetch


def make_loader(dataset: ImageFiles, *, batch_size: int, num_workers: int, pin_memory: bool = False,
                prefetch_factor: int = 4, sample_bytes: int = 0) -> tuple["torch.utils.data.DataLoader", PathBatches]:
    """A reusable loader over ``dataset`` and its sampler: ``sampler.set_paths(paths)``, then iterate the
    loader for that pass's ordered batches. With ``num_workers`` > 0 decode+preprocess run in worker
    processes that persist across passes.

    ``sample_bytes`` (one preprocessed image) lets the worker count and prefetch fit in /dev/shm.
    """
    from torch.utils.data import DataLoader

    num_workers, prefetch_factor = fit_workers_to_shm(num_workers, prefetch_factor, sample_bytes * batch_size,
                                                      shm_free_bytes())
    extra = {}
    if num_workers > 0:  # workers start from the fork server, never as forks of this process (see decode_context)
        start_decode_server()
        extra = {"prefetch_factor": prefetch_factor, "persistent_workers": True, "worker_init_fn": _init_worker,
                 "multiprocessing_context": decode_context()}
    sampler = PathBatches(batch_size)
    loader = DataLoader(dataset, batch_sampler=sampler, num_workers=num_workers, collate_fn=collate,
                        pin_memory=pin_memory, **extra)
    return loader, sampler


# -- how decode workers start ---------------------------------------------------------------------------------
# Never by a plain fork of this process. A fork copies the process at one instant, locks included, but only the
# thread that forked: a lock another thread held then (an import lock, while a prefetch thread imported a PIL
# plugin) stays held in the child for ever, and the worker that next needs it waits at 0 % CPU (issue 20: the
# match stage hung in 6 of 20 runs). The fork server is a fresh interpreter, started once per process by
# fork+exec, that runs no other thread; each worker is a fork of *it*. It imports what a worker needs first,
# so a worker starts in milliseconds; spawn would import torch, torchvision and open_clip in every worker.
DECODE_PRELOAD = ["torch", "torchvision.transforms", "open_clip", "processors.clip.images"]
_SERVER_LOCK = threading.Lock()


def decode_context() -> multiprocessing.context.BaseContext:
    """The multiprocessing context of the decode workers: ``forkserver`` (``spawn`` where there is none)."""
    if "forkserver" not in multiprocessing.get_all_start_methods():
        return multiprocessing.get_context("spawn")
    return multiprocessing.get_context("forkserver")


def start_decode_server() -> None:
    """Start the fork server now, in the background (it takes a few seconds of CPU to import torch and
    open_clip): the match stage calls it before loading its model, so the two overlap. Idempotent; a server
    already running (or one another library started) is kept as it is."""
    context = decode_context()
    if context.get_start_method() != "forkserver":
        return
    from multiprocessing import forkserver

    with _SERVER_LOCK:
        context.set_forkserver_preload(DECODE_PRELOAD)  # read only when the server (re)starts
        forkserver.ensure_running()


def register_decoders() -> None:
    """Import every PIL file-format plugin now (``Image.init``). PIL imports them lazily, the one for a new file
    extension on its first open: done by several decode threads at once, that is an import racing the other
    threads' opens (which can then fail to identify a good file) - and, before decode workers stopped being
    forks, a lock a fork could copy held. Cheap after the first call."""
    Image.init()


def _init_worker(worker_id: int) -> None:
    """First thing in each decode worker, before its first image."""
    register_decoders()
