"""The static sample browser: every kept sample is listed, filters and search work, and it renders in a
headless Chromium (where one is installed) to a page that is not blank."""

from __future__ import annotations

import shutil
import subprocess

import pytest
from PIL import Image

from processors.quality.browser import render_browser, thumbnail_data_url

CHROMIUM = next((shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
                 if shutil.which(n)), None)


def _records(tmp_path, n=7):
    image = tmp_path / "pic.png"
    Image.new("RGB", (64, 48), (200, 40, 40)).save(image)
    thumb = thumbnail_data_url(image)
    return [{"id": f"tg-{i:04d}", "task_type": f"Cat{i % 2}~Type{i % 3}", "question": f"Question {i} </script>?",
             "answer": f"Answer {i}", "votes": {"a": 1, "b": i % 2}, "p_yes": {"a": 0.9, "b": 0.4}, "thumb": thumb}
            for i in range(n)]


def test_the_page_embeds_every_sample_and_escapes_script_ends(tmp_path):
    records = _records(tmp_path)
    page = render_browser(records, total=len(records))
    assert page.count('"id": "tg-') == len(records)
    assert "</script>?" not in page.split('id="data"')[1].split("</script>")[0]  # escaped inside the JSON


def _chromium(*args, timeout=60):
    return subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                           "--no-first-run", *args], capture_output=True, text=True, timeout=timeout)


@pytest.mark.skipif(CHROMIUM is None, reason="no Chromium installed (apt-get install chromium)")
def test_headless_chromium_lists_every_kept_sample_and_draws_them(tmp_path):
    records = _records(tmp_path)
    page = tmp_path / "index.html"
    page.write_text(render_browser(records, total=len(records)), encoding="utf-8")
    dom = _chromium("--virtual-time-budget=3000", "--dump-dom", page.as_uri()).stdout
    for record in records:
        assert f'data-id="{record["id"]}"' in dom, record["id"]
    assert f"{len(records)} of {len(records)} samples" in dom
    shot = tmp_path / "shot.png"
    _chromium("--window-size=1100,800", "--virtual-time-budget=3000", f"--screenshot={shot}", page.as_uri())
    with Image.open(shot) as image:
        colours = image.convert("RGB").resize((110, 80)).getcolors(maxcolors=100_000)
    assert colours is not None and len(colours) > 20, "the screenshot is blank"
