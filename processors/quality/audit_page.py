"""The labelling page of ``taskgalaxy audit``: one self-contained HTML file, plain JavaScript, no server, no network.

It shows one sampled question at a time (image, task path, question, answer) and a person marks whether the
task type and question fit the image, whether the answer is correct and whether the question needs the image,
with the keyboard (the keys are listed on the page). Labels live in the browser's ``localStorage`` under
``taskgalaxy-audit:<audit_id>`` (reopening the page restores them; two audits never share a key) and leave it
through "download labels" as ``labels.json``, the list ``audit --labels`` reads.

What the page holds of each question is only what the person judges, plus its ``qa_id``: no referee vote,
no kept/dropped, no stratum, so nothing can lean the person towards the referees' answer.
"""

from __future__ import annotations

import html
import logging
import re
from pathlib import Path

from processors.publish.records import printable
from processors.quality.audit_page_html import PAGE
from processors.quality.browser import embedded_json, thumbnail_data_url

logger = logging.getLogger(__name__)

IMAGE_SIDE = 768  # a person judges the picture itself: larger than the browser's 160 px thumbnails
PAGE_FILE = "index.html"
SHOWN_FIELDS = ("qa_id", "task_type", "question", "answer")  # all a page item holds, with its picture


def page_items(rows: list[dict], picture) -> list[dict]:
    """The page's data: for each sampled row only ``SHOWN_FIELDS`` and ``image`` (a data URL or None);
    ``picture(row) -> data URL | None``."""
    return [{**{k: printable(row[k]) for k in SHOWN_FIELDS}, "image": picture(row)} for row in rows]


_SLOTS = re.compile(r"__(TITLE|AUDIT_ID|DATA)__")


def render_audit_page(items: list[dict], audit_id: str, title: str = "TaskGalaxy audit") -> str:
    """The page. As in the sample browser, one pass fills the slots: the title as HTML text, the items (and
    the audit id) as JSON inside ``<script>`` (``embedded_json``), and from there into the page only through
    ``textContent`` (never ``innerHTML``), so a question holding ``</script>`` or ``<b>`` stays text."""
    values = {"TITLE": html.escape(title), "AUDIT_ID": html.escape(audit_id),
              "DATA": embedded_json({"audit_id": audit_id, "items": items})}
    return _SLOTS.sub(lambda m: values[m.group(1)], PAGE)


def _picture_source(run_dir: Path | None):
    """``row -> data URL | None``. The page may be sent to someone else, so a picture is read only from an
    image root the run's config vouches for (``trusted_roots``, as ``export`` does)."""
    from loaders.images.paths import PathEscapeError, require_under_roots, trusted_roots

    try:
        trusted = trusted_roots(run_dir) if run_dir is not None else None
    except FileNotFoundError as exc:
        logger.warning("audit: no image roots (%s): the page shows no pictures", exc)
        return lambda row: None

    def picture(row: dict) -> str | None:
        if not row.get("image"):
            return None
        try:
            path = Path(row["image"]) if trusted is None else require_under_roots(Path(row["image"]), trusted)
        except PathEscapeError as exc:
            logger.warning("audit: no picture for %s (%s)", row["qa_id"], exc)
            return None
        return thumbnail_data_url(path, side=IMAGE_SIDE)

    return picture


def write_audit_page(out_dir: Path, rows: list[dict], audit_id: str, run_dir: Path | None = None,
                     title: str = "TaskGalaxy audit", no_picture: list[str] | None = None) -> Path:
    """Write ``out_dir/index.html`` for the sampled ``rows`` (``audit_sample.population`` dicts, in the order
    the person sees them); pictures are checked against ``run_dir``'s trusted image roots when it is given.
    ``no_picture``, when given, gets the qa_id of every row the page shows without a picture."""
    from processors.shared_files import write_atomic

    items = page_items(rows, _picture_source(run_dir))
    if no_picture is not None:
        no_picture.extend(item["qa_id"] for item in items if not item["image"])
    page = render_audit_page(items, audit_id, title).encode("utf-8")
    target = Path(out_dir) / PAGE_FILE
    write_atomic(target, lambda handle: handle.write(page))
    logger.info("audit: labelling page for %d questions in %s", len(rows), target)
    return target
