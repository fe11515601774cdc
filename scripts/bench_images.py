"""Benchmark the images stage's two hot paths; the last line is ``key=value`` pairs.

1. Validate + hash: ``processors.image_validate.check_image`` over the same JPEG files as a naive loop of
   ``Image.open(path).convert("RGB")`` (what a script would do), in images/s; ``speedup`` = ours / naive.
   Ours = read bytes + full-stream decode (DCT-scaled for JPEG) + EXIF + mode check + SHA-256 + dHash,
   in the stage's thread pool (``--workers``).
2. Downloads: ``loaders.images.download.fetch_urls`` against a local aiohttp server that answers every
   request after ``--latency-ms``; ``download_share`` = measured req/s / (concurrency / latency), goal >= 0.8.

Usage: python scripts/bench_images.py [--images 300] [--workers 2] [--urls 640] [--concurrency 32]
"""

from __future__ import annotations

import argparse
import asyncio
import io
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image


def make_photos(folder: Path, count: int, size=(640, 480)) -> list[Path]:
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0 : size[1], 0 : size[0]]
    paths = []
    for i in range(count):
        phase = rng.uniform(0, 6.28, 3)
        pixels = np.stack([127 + 120 * np.sin(xx / (20 + 5 * c) + yy / (31 + i % 7) + phase[c]) for c in range(3)], -1)
        pixels += rng.normal(0, 4, pixels.shape)  # mild sensor noise: ~60 KB per 640x480 JPEG, like photos
        path = folder / f"{i:05d}.jpg"
        Image.fromarray(pixels.clip(0, 255).astype("uint8")).save(path, "JPEG", quality=90)
        paths.append(path)
    return paths


def bench_validate(paths: list[Path], workers: int, fast_jpeg: bool = True) -> float:
    from processors.image_validate import ImageLimits, check_image

    limits = ImageLimits(fast_jpeg=fast_jpeg)

    def one(path: Path) -> bool:
        return check_image(path.read_bytes(), limits, name=str(path)).ok

    start = time.perf_counter()
    with ThreadPoolExecutor(max_workers=workers) as pool:
        assert all(pool.map(one, paths))
    return len(paths) / (time.perf_counter() - start)


def bench_naive(paths: list[Path]) -> float:
    start = time.perf_counter()
    for path in paths:
        with Image.open(path) as image:
            image.convert("RGB")
    return len(paths) / (time.perf_counter() - start)


class LatencyServer:
    """Answers GET /<n>.jpg with a small JPEG after a fixed delay (simulated network latency)."""

    def __init__(self, latency_s: float):
        from aiohttp import web

        out = io.BytesIO()
        Image.new("RGB", (64, 48), (10, 20, 30)).save(out, "JPEG")
        body, self.latency_s = out.getvalue(), latency_s

        async def handler(request):
            await asyncio.sleep(self.latency_s)
            return web.Response(body=body, content_type="image/jpeg")

        self.app = web.Application()
        self.app.router.add_get("/{name}", handler)
        self.loop = asyncio.new_event_loop()
        self.ready = threading.Event()
        threading.Thread(target=self._serve, daemon=True).start()
        self.ready.wait(10)

    def _serve(self) -> None:
        from aiohttp import web

        asyncio.set_event_loop(self.loop)
        runner = web.AppRunner(self.app, access_log=None)
        self.loop.run_until_complete(runner.setup())
        site = web.TCPSite(runner, "127.0.0.1", 0, backlog=1024)
        self.loop.run_until_complete(site.start())
        self.port = site._server.sockets[0].getsockname()[1]
        self.ready.set()
        self.loop.run_forever()


def bench_download(count: int, concurrency: int, latency_s: float) -> tuple[float, float]:
    from loaders.images.download import fetch_urls
    from loaders.images.download import DownloadConfig

    server = LatencyServer(latency_s)
    config = DownloadConfig(concurrency=concurrency, allowed_networks=("127.0.0.1/32",), retries=0)
    urls = [f"http://127.0.0.1:{server.port}/{i}.jpg" for i in range(count)]
    fetch_urls(urls[:concurrency], config)  # warm-up
    start = time.perf_counter()
    results = fetch_urls(urls, config)
    elapsed = time.perf_counter() - start
    assert all(r.reason is None for r in results), [r.detail for r in results if r.reason][:3]
    rate = count / elapsed
    return rate, rate / (concurrency / latency_s)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=300)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--urls", type=int, default=640)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--latency-ms", type=float, default=50.0)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        paths = make_photos(Path(tmp), args.images)
        bench_naive(paths[:20])  # warm caches
        naive = bench_naive(paths)
        ours = bench_validate(paths, args.workers)
        ours_1 = bench_validate(paths, 1)
        full_1 = bench_validate(paths, 1, fast_jpeg=False)
    print(f"validate+hash: naive open+convert {naive:.0f} img/s; ours {ours:.0f} img/s ({args.workers} threads), "
          f"{ours_1:.0f} img/s (1 thread), {full_1:.0f} img/s (1 thread, full-size JPEG decode)")
    rate, share = bench_download(args.urls, args.concurrency, args.latency_ms / 1000)
    print(f"download: {rate:.0f} req/s at concurrency {args.concurrency}, latency {args.latency_ms:.0f} ms "
          f"(ideal {args.concurrency / (args.latency_ms / 1000):.0f} req/s)")
    print(f"images={args.images} naive_img_s={naive:.1f} validate_img_s={ours:.1f} validate_1thread_img_s={ours_1:.1f} "
          f"validate_full_decode_1thread_img_s={full_1:.1f} speedup={ours / naive:.2f} "
          f"download_req_s={rate:.1f} download_share={share:.2f}")


if __name__ == "__main__":
    main()
