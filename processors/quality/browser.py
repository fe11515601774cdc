"""A static HTML browser of the published samples: one self-contained file, plain JavaScript, no network.

Each sample shows a thumbnail (a small JPEG inlined as a data URL, so the page works from ``file://`` and from
a downloaded Hub folder, where the images live inside Parquet), its task path, question, answer, the votes and
p(yes) of every referee. Filters: first-level category, task type, and free-text search over task path,
question and answer. Large runs list a deterministic sample of ``max_samples`` (default ``MAX_SAMPLES``; the
page says how many of how many kept samples it lists): a browser tab holds a few thousand cards comfortably,
not 400k.
"""

from __future__ import annotations

import base64
import hashlib
import html
import io
import json
import logging
import re
from collections.abc import Callable
from pathlib import Path

from builder.outputs import StageNotReadyError, column_values, load_stage_output
from processors.publish.export import printable

logger = logging.getLogger(__name__)

THUMB_SIDE = 160
MAX_SAMPLES = 3000


def thumbnail_data_url(path: Path, side: int = THUMB_SIDE) -> str | None:
    """A small JPEG of the image as a data URL, decoded the project's one way (``processors.imageio.open_rgb``:
    EXIF orientation applied, so a phone photo stands upright; the decompression-bomb guard); None if unreadable."""
    from PIL import Image

    from processors.imageio import open_rgb

    try:
        image = open_rgb(path, max_side=side)
        buffer = io.BytesIO()
        image.save(buffer, format="JPEG", quality=75)
    except (OSError, ValueError, Image.DecompressionBombError) as exc:
        logger.warning("browser: no thumbnail for %s (%s)", path, exc)
        return None
    return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode()


def browser_records(run_dir: Path, resolve_image: Callable[[str], Path], max_samples: int = MAX_SAMPLES) -> tuple[list[dict], int]:
    """(records shown, kept samples in all): the final rows joined with their votes by ``qa_id``."""
    final = load_stage_output(run_dir, "final")
    try:
        score = load_stage_output(run_dir, "score")
        ballots = dict(zip(column_values(score, "qa_id"),
                           zip(column_values(score, "votes"), column_values(score, "p_yes"))))
    except StageNotReadyError:  # a final stage of another pipeline (or score gone): samples without votes
        ballots = {}
    ids = column_values(final, "id")
    order = sorted(range(len(ids)), key=lambda i: hashlib.sha256(ids[i].encode()).hexdigest())[:max_samples]
    columns = {c: column_values(final, c) for c in ("id", "image", "task_type", "conversations", "qa_id")
               if c in final.column_names}
    records = []
    for i in sorted(order, key=lambda i: ids[i]):
        votes, p_yes = ballots.get(columns.get("qa_id", ids)[i], ({}, {}))
        human, gpt = columns["conversations"][i][0]["value"], columns["conversations"][i][1]["value"]
        records.append({
            "id": ids[i], "task_type": printable(columns["task_type"][i]),
            "question": printable(human.removeprefix("<image>\n")), "answer": printable(gpt),
            "votes": votes, "p_yes": {k: (None if v is None else round(v, 3)) for k, v in (p_yes or {}).items()},
            "thumb": thumbnail_data_url(resolve_image(columns["image"][i])),
        })
    return records, len(ids)


# Inside <script> the HTML parser looks for "</script" and "<!--" (which can swallow the rest of the page);
# JSON allows any character as \uXXXX, so none of these characters appears raw in the embedded data.
_JSON_ESCAPES = {"<": "\\u003c", ">": "\\u003e", "&": "\\u0026", "\u2028": "\\u2028", "\u2029": "\\u2029"}


def embedded_json(value) -> str:
    """JSON safe to embed in an HTML <script> element: ``<``, ``>``, ``&``, U+2028 and U+2029 escaped."""
    text = json.dumps(value, ensure_ascii=False)
    for raw, escaped in _JSON_ESCAPES.items():
        text = text.replace(raw, escaped)
    return text


def shown_note(shown: int, total: int) -> str:
    """What the page says about how many kept samples it lists."""
    if shown == total:
        return f"all {total:,} kept samples"
    return f"a deterministic sample of {shown:,} of {total:,} kept samples"


_SLOTS = re.compile(r"__(TITLE|NOTE|DATA)__")


def render_browser(records: list[dict], total: int, title: str = "TaskGalaxy samples") -> str:
    """The page. Text reaches it three ways, each escaped for where it lands: the title and the note as HTML
    text (``html.escape``), the records as JSON inside <script> (``embedded_json``), and from there into the
    page only through ``textContent`` and ``new Option`` (never ``innerHTML``). One pass fills the slots, so
    a title holding ``__DATA__`` stays text."""
    values = {"TITLE": html.escape(title), "NOTE": html.escape(shown_note(len(records), total)),
              "DATA": embedded_json(records)}
    return _SLOTS.sub(lambda m: values[m.group(1)], PAGE)


def write_browser(run_dir: Path, folder: Path, resolve_image: Callable[[str], Path],
                  max_samples: int = MAX_SAMPLES) -> Path:
    """Write ``folder/index.html`` listing at most ``max_samples`` kept samples (the page says how many of how
    many); returns its path."""
    records, total = browser_records(run_dir, resolve_image, max_samples)
    target = folder / "index.html"
    from processors.shared_files import unique_tmp

    tmp = unique_tmp(target)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        tmp.write_bytes(render_browser(records, total).encode("utf-8"))
        tmp.replace(target)
    except BaseException as exc:
        tmp.unlink(missing_ok=True)  # a full disk leaves no half page behind
        if not isinstance(exc, OSError) or exc.errno is None:
            raise
        from processors.publish.writes import write_failure

        raise write_failure(exc, doing="write the sample browser", path=target, command="the same command",
                            outcome=f"No partial page is left; what was written before the browser in "
                                    f"{folder.parent} is complete (for `export`: the LLaVA JSON and its "
                                    "images).") from exc
    logger.info("browser: %s in %s", shown_note(len(records), total), target)
    return target


PAGE = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>__TITLE__</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<style>
body{font-family:system-ui,sans-serif;margin:0;background:#f4f5f7;color:#222}
header{position:sticky;top:0;background:#1f3b5c;color:#fff;padding:10px 16px;display:flex;gap:10px;flex-wrap:wrap;align-items:center}
header h1{font-size:18px;margin:0 12px 0 0}
select,input{font-size:14px;padding:4px 6px;max-width:28em}
#count{margin-left:auto}
main{display:grid;grid-template-columns:repeat(auto-fill,minmax(420px,1fr));gap:12px;padding:12px}
.sample{background:#fff;border-radius:6px;padding:10px;display:flex;gap:10px;box-shadow:0 1px 2px #0002}
.sample img{width:160px;height:auto;align-self:flex-start;border-radius:4px;background:#ddd}
.path{font-size:12px;color:#1f3b5c;font-weight:600}
.q{margin:6px 0}.a{color:#444}.votes{font-size:12px;color:#666;margin-top:6px}
.yes{color:#1a7f37}.no{color:#b42318}
</style></head><body>
<header><h1>__TITLE__</h1>
<select id="category"><option value="">every category</option></select>
<select id="task"><option value="">every task type</option></select>
<input id="search" type="search" placeholder="search task, question, answer">
<span id="count"></span><span id="note">(__NOTE__ listed)</span></header>
<main id="list"></main>
<script id="data" type="application/json">__DATA__</script>
<script>
"use strict";
const samples = JSON.parse(document.getElementById("data").textContent);
const category = s => s.task_type.split("~")[0];
const byId = id => document.getElementById(id);
function options(select, values) {
  const keep = select.value;
  select.length = 1;
  for (const v of [...new Set(values)].sort()) select.add(new Option(v, v));
  select.value = values.includes(keep) ? keep : "";
}
function card(s) {
  const el = document.createElement("div");
  el.className = "sample"; el.dataset.id = s.id;
  if (s.thumb) { const img = document.createElement("img"); img.src = s.thumb; img.alt = s.id; el.append(img); }
  const body = document.createElement("div");
  const line = (cls, text) => { const d = document.createElement("div"); d.className = cls; d.textContent = text; body.append(d); return d; };
  line("path", s.task_type.split("~").join(" \u203a "));
  line("q", "Q: " + s.question);
  line("a", "A: " + s.answer);
  const v = line("votes", "");
  for (const [name, vote] of Object.entries(s.votes)) {
    const span = document.createElement("span");
    span.className = vote === 1 ? "yes" : "no";
    const p = s.p_yes[name];
    span.textContent = `${name}: ${vote === null ? "\u2013" : vote}` + (p === null || p === undefined ? "" : ` (p=${p})`) + "  ";
    v.append(span);
  }
  body.append(Object.assign(document.createElement("div"), {className: "votes", textContent: s.id}));
  el.append(body);
  return el;
}
function render() {
  const cat = byId("category").value, text = byId("search").value.toLowerCase();
  options(byId("task"), samples.filter(s => !cat || category(s) === cat).map(s => s.task_type));
  const task = byId("task").value;
  const shown = samples.filter(s => (!cat || category(s) === cat) && (!task || s.task_type === task) &&
    (!text || (s.task_type + " " + s.question + " " + s.answer).toLowerCase().includes(text)));
  byId("list").replaceChildren(...shown.map(card));
  byId("count").textContent = `${shown.length} of ${samples.length} samples`;
}
options(byId("category"), samples.map(category));
for (const id of ["category", "task"]) byId(id).addEventListener("change", render);
byId("search").addEventListener("input", render);
render();
</script></body></html>
"""
