"""The HTML, CSS and JavaScript of the audit's labelling page (``audit_page.render_audit_page`` fills the slots).

Kept apart from the Python so each stays readable; the look is the sample browser's (``browser.PAGE``). Text
of a question reaches the page only through ``textContent``; the labels leave it only as ``labels.json``.
"""

PAGE = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>__TITLE__</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta name="taskgalaxy-audit" content="__AUDIT_ID__">
<style>
body{font-family:system-ui,sans-serif;margin:0;background:#f4f5f7;color:#222}
header{position:sticky;top:0;background:#1f3b5c;color:#fff;padding:10px 16px;display:flex;gap:10px;flex-wrap:wrap;align-items:center}
header h1{font-size:18px;margin:0 12px 0 0}
header button{font-size:14px;padding:4px 10px}
#progress{margin-left:auto;font-weight:600}
#storage{color:#ffd58a}
main{display:flex;gap:16px;padding:16px;flex-wrap:wrap;align-items:flex-start}
.card{background:#fff;border-radius:6px;padding:14px;box-shadow:0 1px 2px #0002;flex:1 1 420px;min-width:0}
#picture{max-width:100%;max-height:70vh;border-radius:4px;background:#ddd;display:block}
.path{font-size:13px;color:#1f3b5c;font-weight:600}
.q,.a{margin:10px 0;white-space:pre-wrap;overflow-wrap:anywhere}.a{color:#444}
.label{margin:14px 0 4px;font-weight:600}
.choices button{font-size:14px;padding:5px 12px;margin:2px 4px 2px 0;border:1px solid #99a;border-radius:4px;background:#fff;cursor:pointer}
.choices button[aria-pressed=true]{background:#1f3b5c;color:#fff;border-color:#1f3b5c}
kbd{font-family:ui-monospace,monospace;font-size:12px;border:1px solid #aab;border-bottom-width:2px;border-radius:3px;padding:0 4px;background:#f8f8fb;color:#222}
.keys{font-size:13px;color:#555;line-height:1.9}
#strip{display:flex;flex-wrap:wrap;gap:3px;margin-top:10px}
#strip span{width:12px;height:12px;border-radius:2px;background:#d5d8de;cursor:pointer}
#strip span.done{background:#1a7f37}#strip span.current{outline:2px solid #1f3b5c}
.id{font-size:12px;color:#888;margin-top:10px}
</style></head><body>
<header><h1>__TITLE__</h1>
<button id="prev" type="button">&#8592; previous</button>
<button id="next" type="button">next &#8594;</button>
<button id="todo" type="button">next unlabelled</button>
<span id="position"></span>
<span id="storage"></span>
<span id="progress"></span>
<button id="download" type="button">download labels</button></header>
<main>
<div class="card"><img id="picture" alt="the image of this question"><div id="noimage" hidden>(no picture)</div></div>
<div class="card">
<div class="path" id="path"></div>
<div class="q" id="question"></div>
<div class="a" id="answer"></div>
<div class="label">Do the task type and the question fit the image?</div>
<div class="choices">
<button type="button" data-field="fits" data-value="true"><kbd>1</kbd> yes</button>
<button type="button" data-field="fits" data-value="false"><kbd>2</kbd> no</button></div>
<div class="label">Is the answer correct?</div>
<div class="choices">
<button type="button" data-field="answer_correct" data-value="true"><kbd>q</kbd> correct</button>
<button type="button" data-field="answer_correct" data-value="false"><kbd>w</kbd> wrong</button>
<button type="button" data-field="answer_correct" data-value="unsure"><kbd>e</kbd> unsure</button></div>
<div class="label">Does answering it need the image?</div>
<div class="choices">
<button type="button" data-field="needs_image" data-value="true"><kbd>a</kbd> yes</button>
<button type="button" data-field="needs_image" data-value="false"><kbd>s</kbd> no, answerable without it</button>
<button type="button" data-field="needs_image" data-value="unsure"><kbd>d</kbd> unsure</button></div>
<div class="keys">Keys: <kbd>1</kbd>/<kbd>2</kbd> fits yes/no &middot; <kbd>q</kbd>/<kbd>w</kbd>/<kbd>e</kbd> answer correct/wrong/unsure &middot;
<kbd>a</kbd>/<kbd>s</kbd>/<kbd>d</kbd> needs the image yes/no/unsure &middot; <kbd>j</kbd> or <kbd>&#8594;</kbd> next &middot;
<kbd>k</kbd> or <kbd>&#8592;</kbd> previous &middot; <kbd>u</kbd> next unlabelled. A question counts as labelled once
"fits" is marked; only those go into the download. Labels stay in this browser until you download them.</div>
<div id="strip"></div>
<div class="id" id="qa-id"></div>
</div></main>
<script id="data" type="application/json">__DATA__</script>
<script>
"use strict";
const data = JSON.parse(document.getElementById("data").textContent);
const items = data.items;
const STORE = "taskgalaxy-audit:" + data.audit_id;  // one key per audit: two audits never mix their labels
const KEYS = {"1": ["fits", true], "2": ["fits", false], q: ["answer_correct", true], w: ["answer_correct", false],
  e: ["answer_correct", "unsure"], a: ["needs_image", true], s: ["needs_image", false], d: ["needs_image", "unsure"]};
const VALUES = {"true": true, "false": false, "unsure": "unsure"};
const byId = id => document.getElementById(id);
const known = new Set(items.map(it => it.qa_id));
let state = {labels: {}, position: 0};
let saved = true;

function restore() {
  try {
    const stored = JSON.parse(localStorage.getItem(STORE) || "null");
    if (stored && typeof stored.labels === "object" && stored.labels !== null) {
      for (const [id, label] of Object.entries(stored.labels)) if (known.has(id)) state.labels[id] = label;
      const p = Number(stored.position);
      if (Number.isInteger(p) && p >= 0 && p < items.length) state.position = p;
    }
  } catch (err) { saved = false; }
}
function persist() {
  try { localStorage.setItem(STORE, JSON.stringify(state)); saved = true; } catch (err) { saved = false; }
}
const labelOf = id => state.labels[id] || {};
const labelled = id => typeof labelOf(id).fits === "boolean";
const tri = v => (v === true || v === false) ? v : null;  // "unsure" and "not marked" both leave as null
function exported() {
  return items.filter(it => labelled(it.qa_id)).map(it => {
    const l = labelOf(it.qa_id);
    // audit_id: which draw the labels were made on, so `audit --labels` reads them against that sample
    return {qa_id: it.qa_id, fits: l.fits, answer_correct: tri(l.answer_correct), needs_image: tri(l.needs_image),
            audit_id: data.audit_id};
  });
}
function mark(field, value) {
  if (!items.length) return;
  const id = items[state.position].qa_id;
  state.labels[id] = Object.assign({}, labelOf(id), {[field]: value});
  persist(); render();
}
function go(position) {
  if (!items.length) return;
  state.position = Math.max(0, Math.min(items.length - 1, position));
  persist(); render();
}
function nextUnlabelled() {
  for (let step = 1; step <= items.length; step++) {
    const p = (state.position + step) % items.length;
    if (!labelled(items[p].qa_id)) return go(p);
  }
}
function download() {
  const blob = new Blob([JSON.stringify(exported(), null, 1) + "\\n"], {type: "application/json"});
  const link = document.createElement("a");
  link.href = URL.createObjectURL(blob);
  link.download = "labels.json";
  document.body.append(link); link.click(); link.remove();
  setTimeout(() => URL.revokeObjectURL(link.href), 10000);
}
function render() {
  const done = items.filter(it => labelled(it.qa_id)).length;
  byId("progress").textContent = `${done} of ${items.length} labelled`;
  byId("storage").textContent = saved ? "" : "(this browser does not keep the labels: download them before closing)";
  const strip = byId("strip");
  strip.replaceChildren(...items.map((it, i) => {
    const cell = document.createElement("span");
    cell.className = (labelled(it.qa_id) ? "done" : "") + (i === state.position ? " current" : "");
    cell.title = `question ${i + 1}`;
    cell.addEventListener("click", () => go(i));
    return cell;
  }));
  if (!items.length) { byId("position").textContent = "nothing to label"; return; }
  const it = items[state.position], label = labelOf(it.qa_id);
  byId("position").textContent = `question ${state.position + 1} of ${items.length}`;
  byId("path").textContent = it.task_type.split("~").join(" \\u203a ");
  byId("question").textContent = "Q: " + it.question;
  byId("answer").textContent = "A: " + it.answer;
  byId("qa-id").textContent = it.qa_id;
  const picture = byId("picture");
  picture.hidden = !it.image; byId("noimage").hidden = !!it.image;
  if (it.image) picture.src = it.image; else picture.removeAttribute("src");
  for (const button of document.querySelectorAll(".choices button"))
    button.setAttribute("aria-pressed", String(label[button.dataset.field] === VALUES[button.dataset.value]));
}
document.addEventListener("keydown", event => {
  if (event.ctrlKey || event.metaKey || event.altKey) return;  // leave the browser's own shortcuts alone
  const key = event.key.length === 1 ? event.key.toLowerCase() : event.key;
  if (KEYS[key]) mark(...KEYS[key]);
  else if (key === "j" || key === "ArrowRight") go(state.position + 1);
  else if (key === "k" || key === "ArrowLeft") go(state.position - 1);
  else if (key === "u") nextUnlabelled();
  else return;
  event.preventDefault();
});
for (const button of document.querySelectorAll(".choices button"))
  button.addEventListener("click", () => mark(button.dataset.field, VALUES[button.dataset.value]));
byId("prev").addEventListener("click", () => go(state.position - 1));
byId("next").addEventListener("click", () => go(state.position + 1));
byId("todo").addEventListener("click", nextUnlabelled);
byId("download").addEventListener("click", download);
restore(); render();
</script></body></html>
"""
