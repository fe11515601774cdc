"""How the CLIP decode workers start (issue 20: `match` hung for ever in 6 of 20 runs).

A worker that is a fork of this process inherits every lock as it was at that instant. The match stage's
prefetch threads decode images while the workers start, and PIL imports a file format's plugin on its first
file: a worker forked while such a thread held that module's import lock waited for it for ever, at 0 % CPU.
The workers now start from a fork server (a clean process), so no lock of this process can reach them."""

from __future__ import annotations

import importlib
import threading
import uuid

import numpy as np
from PIL import Image

from processors.clip.images import ImageFiles, decode_context, make_loader

HANG_S = 120  # the fork server's first start imports torch and open_clip: seconds on a loaded 2-core machine


def test_decode_workers_never_start_as_forks_of_this_process():
    loader, _ = make_loader(ImageFiles(lambda image: image), batch_size=2, num_workers=1)
    assert loader.multiprocessing_context is not None
    assert loader.multiprocessing_context.get_start_method() in ("forkserver", "spawn")
    assert decode_context().get_start_method() != "fork"
    assert make_loader(ImageFiles(lambda image: image), batch_size=2, num_workers=0)[0].multiprocessing_context is None


def test_a_thread_holding_an_import_lock_while_the_workers_start_cannot_hang_them(tmp_path, monkeypatch):
    """The hang, made certain: a thread is inside the import of a module (holding its lock) while the loader
    starts its workers, and each worker imports that module lazily, on its first image, as PIL does with a
    plugin. A forked worker waits for the lock for ever; a worker from the fork server imports it itself."""
    tag = uuid.uuid4().hex[:8]
    (tmp_path / f"tg_gate_{tag}.py").write_text(
        "import threading\nARMED = False\nENTERED = threading.Event()\nRELEASE = threading.Event()\n")
    (tmp_path / f"tg_plugin_{tag}.py").write_text(
        f"import tg_gate_{tag} as gate\nif gate.ARMED:\n    gate.ENTERED.set()\n    gate.RELEASE.wait(300)\n")
    (tmp_path / f"tg_decode_{tag}.py").write_text(
        "import torch\n\n\n"
        "class LazyImport:\n"
        "    def __call__(self, image):\n"
        f"        import tg_plugin_{tag}  # noqa: F401 - on first use, as PIL imports a plugin\n"
        "        return torch.zeros(3, 4, 4, dtype=torch.uint8)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    paths = []
    for i in range(4):
        paths.append(tmp_path / f"img{i}.png")
        Image.fromarray(np.full((8, 8, 3), 40 * i, dtype=np.uint8)).save(paths[-1])

    gate = importlib.import_module(f"tg_gate_{tag}")
    gate.ARMED = True
    holder = threading.Thread(target=importlib.import_module, args=(f"tg_plugin_{tag}",), daemon=True)
    holder.start()
    assert gate.ENTERED.wait(30)  # the holder is inside the import: it holds the module's lock

    decode = importlib.import_module(f"tg_decode_{tag}")
    loader, sampler = make_loader(ImageFiles(decode.LazyImport(), guard_aspect=False), batch_size=2, num_workers=1)
    sampler.set_paths(paths)
    batches: list = []
    consumer = threading.Thread(target=lambda: batches.extend(loader), daemon=True)
    consumer.start()  # the workers start here, while the holder still holds the lock
    consumer.join(HANG_S)
    hung = consumer.is_alive()
    gate.RELEASE.set()
    holder.join(30)
    iterator = getattr(loader, "_iterator", None)
    if iterator is not None:
        iterator._shutdown_workers()
    assert not hung, f"the decode workers hung for {HANG_S} s on an import lock a thread held when they started"
    assert sorted(i for batch in batches for i in batch.indices) == [0, 1, 2, 3]
