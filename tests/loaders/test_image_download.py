"""URL downloads against a local server: retries, timeouts, size caps, redirects and the address guard."""

from __future__ import annotations

import io

import pytest
from PIL import Image

from loaders.images.download import fetch_urls
from loaders.images.download import DownloadConfig
from local_http import LocalServer


def _jpeg() -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (32, 24), (200, 10, 10)).save(out, "JPEG")
    return out.getvalue()


FAST = dict(backoff_s=0.01, max_backoff_s=0.05, retries=2, connect_timeout_s=2, read_timeout_s=0.5, total_timeout_s=3)
LOOPBACK = DownloadConfig(allowed_networks=("127.0.0.1/32",), **FAST)


@pytest.fixture(scope="module")
def server():
    with LocalServer(images={"a.jpg": _jpeg(), "flaky.jpg": _jpeg()}) as srv:
        srv.fail_first["flaky.jpg"] = 2
        yield srv


def test_success_404_500_retry_and_429(server):
    urls = [server.url("img/a.jpg"), server.url("status/404"), server.url("status/500"),
            server.url("img/flaky.jpg"), server.url("retry-after")]
    got = fetch_urls(urls, LOOPBACK)
    assert got[0].reason is None and got[0].data == _jpeg()
    assert got[1].reason == "download_http_error" and "404" in got[1].detail and got[1].attempts == 1
    assert got[2].reason == "download_http_error" and got[2].attempts == 3  # retried, then gave up
    assert got[3].reason is None and got[3].attempts == 3  # 500, 500, then the image
    assert got[4].reason is None and server.hits["retry-after"] == 2


def test_slow_body_times_out(server):
    got = fetch_urls([server.url("slow")], DownloadConfig(**{**FAST, "retries": 0}, allowed_networks=("127.0.0.1/32",)))
    assert got[0].reason == "download_timeout"


def test_oversized_bodies_are_cut_off(server):
    config = DownloadConfig(max_bytes=2000, allowed_networks=("127.0.0.1/32",), **FAST)
    got = fetch_urls([server.url("big"), server.url("stream-big")], config)
    assert [g.reason for g in got] == ["download_too_large", "download_too_large"]


def test_loopback_refused_unless_allowed(server):
    got = fetch_urls([server.url("img/a.jpg")], DownloadConfig(**FAST))
    assert got[0].reason == "download_refused" and "127.0.0.1" in got[0].detail
    assert fetch_urls([server.url("img/a.jpg")], DownloadConfig(allow_private_addresses=True, **FAST))[0].data


@pytest.mark.parametrize("target", ["http://127.0.0.2:9/x.jpg", "http://169.254.169.254/latest/meta-data",
                                    "http://10.0.0.1/a.jpg", "http://[::1]/a.jpg", "file:///etc/passwd"])
def test_redirect_to_private_address_refused(server, target):
    got = fetch_urls([server.url(f"redirect?to={target}")], LOOPBACK)
    assert got[0].reason == "download_refused", got[0]


def test_bad_urls_fail_cleanly():
    got = fetch_urls(["", "ftp://example.com/a.jpg", "not a url"], DownloadConfig(**FAST))
    assert {g.reason for g in got} == {"download_refused"}
