"""The static sample browser: every kept sample is listed, filters and search work, and it renders in a
headless Chromium (where one is installed) to a page that is not blank."""

from __future__ import annotations

import json
import subprocess

import pytest
from PIL import Image

from browser_helpers import CHROMIUM, skip_reason
from processors.quality.browser import render_browser, thumbnail_data_url



def _records(tmp_path, n=7):
    image = tmp_path / "pic.png"
    Image.new("RGB", (64, 48), (200, 40, 40)).save(image)
    thumb = thumbnail_data_url(image)
    hostile = ["Question {i} </script>?", "Question {i} <!--<script> a&b", "Question {i} \u2028 <b>bold</b> -->"]
    return [{"id": f"tg-{i:04d}", "task_type": f"Cat{i % 2}~Type{i % 3}", "question": hostile[i % 3].format(i=i),
             "answer": f"Answer {i}", "votes": {"a": 1, "b": i % 2}, "p_yes": {"a": 0.9, "b": 0.4}, "thumb": thumb}
            for i in range(n)]


def test_the_page_embeds_every_sample_and_escapes_script_ends(tmp_path):
    records = _records(tmp_path)
    page = render_browser(records, total=len(records))
    assert page.count('"id": "tg-') == len(records)
    data = page.split('id="data" type="application/json">')[1].split("</script>")[0]
    assert not set("<>&\u2028\u2029") & set(data)  # nothing the HTML parser reads inside <script>
    assert json.loads(data) == records
    assert "all 7 kept samples" in page


def test_the_page_says_how_many_of_how_many_it_lists(tmp_path):
    records = _records(tmp_path, n=3)
    assert "a deterministic sample of 3 of 12,000 kept samples" in render_browser(records, total=12_000)


def test_thumbnails_stand_upright(tmp_path):
    import base64
    import io

    image = Image.new("RGB", (80, 40), (200, 40, 40))  # landscape, stored as portrait + EXIF "rotate"
    exif = Image.Exif()
    exif[0x0112] = 6
    path = tmp_path / "phone.jpg"
    image.transpose(Image.Transpose.ROTATE_90).save(path, exif=exif)
    url = thumbnail_data_url(path)
    with Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1]))) as thumb:
        assert thumb.width > thumb.height


def _chromium(*args, timeout=60):
    return subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                           "--no-first-run", *args], capture_output=True, text=True, timeout=timeout)


@pytest.mark.skipif(skip_reason(playwright=False) is not None, reason=skip_reason(playwright=False) or "")
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
