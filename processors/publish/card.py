"""The dataset card (README.md) of a published run: metadata, YAML configs, counts, failures, cost, how to load.

The metadata block is built with ``huggingface_hub``'s ``DatasetCardData`` (license, task categories,
language, size category, tags, pretty name, one ``configs:`` entry per published folder so the Hub's viewer
reads every config). Stages may add a Markdown section of their own (``NN_stage/card.md``, e.g. the final
stage's quality report) and plots (``NN_stage/*.png``); the card includes them without interpreting them. A
run with a human audit's figures (``audit/figures.json``, ``taskgalaxy audit``) gets a "Human audit" section.
"""

from __future__ import annotations

import html
import re
import unicodedata
from collections.abc import Sequence
from pathlib import Path
from urllib.parse import quote

from pydantic import BaseModel, ConfigDict, Field, field_validator

from builder.config import read_config_data
from builder.stage import Stage

SIZE_CATEGORIES = ((1_000, "n<1K"), (10_000, "1K<n<10K"), (100_000, "10K<n<100K"), (1_000_000, "100K<n<1M"),
                   (10_000_000, "1M<n<10M"), (100_000_000, "10M<n<100M"), (1_000_000_000, "100M<n<1B"),
                   (10_000_000_000, "1B<n<10B"), (100_000_000_000, "10B<n<100B"),
                   (1_000_000_000_000, "100B<n<1T"))


_LINE_BREAKS = "\n\r\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029"  # what str.splitlines() splits on


class CardSettings(BaseModel):
    """Keys of the top-level ``card`` section: the dataset card's metadata on the Hub."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    license: str = Field("other", description="a Hub license id (e.g. cc-by-4.0); the default `other` because "
                         "the images keep their sources' licenses (give license_name / license_link)")
    license_name: str | None = Field(None, description="with license: other, the license's name")
    license_link: str | None = Field(None, description="with license: other, where its terms are")
    language: list[str] = Field(default_factory=lambda: ["en"], description="languages of the questions")
    pretty_name: str | None = Field(None, description="the dataset's display name; default from the run name")
    tags: list[str] = Field(default_factory=lambda: ["taskgalaxy", "multimodal", "instruction-tuning",
                                                     "synthetic"])
    task_categories: list[str] = Field(default_factory=lambda: ["visual-question-answering",
                                                                "image-text-to-text"])

    @field_validator("license", "license_name", "license_link", "pretty_name", "language", "tags",
                     "task_categories")
    @classmethod
    def _one_line(cls, value):
        """Each of these is one short line: a line break in ``pretty_name`` would end the card's title and
        start Markdown of its own, and the Hub reads the others as single values."""
        for text in value if isinstance(value, list) else [value]:
            if text is None:
                continue
            bad = next((ch for ch in text if ch in _LINE_BREAKS or unicodedata.category(ch) == "Cc"), None)
            if bad is not None:
                kind = "a line break" if bad in _LINE_BREAKS else "a control character"
                raise ValueError(f"must be a single line of text, but {text[:60]!r} holds {kind} "
                                 f"(U+{ord(bad):04X}); write it on one line")
        return value


# Markdown's inline punctuation; ``_`` only where it can open or close emphasis (``task_type`` is left as is).
_MD_INLINE = re.compile(r"([\\`*\[\]|#~$!])|(?<![^\W_])_|_(?![^\W_])")


def md_text(text) -> str:
    """``text`` as itself on one line of Markdown (a table cell, a heading): whitespace and line breaks as one
    space; ``<``, ``>``, ``&`` as HTML entities (the Hub renders raw HTML); Markdown's inline punctuation
    (``| \\ ` * _ [ ] # ~ $ !``) backslash-escaped, so a ``|`` does not start a new cell, nor ``[x](...)`` a
    link."""
    text = html.escape(" ".join(str(text).split()), quote=False)
    return _MD_INLINE.sub(lambda m: "\\" + m.group(0), text)


def md_code(text) -> str:
    """``text`` for inside a code span in a table cell: one line, no backtick (a code span shows everything
    else as it is, backslashes included), ``|`` escaped (GFM reads it before the code span)."""
    return " ".join(str(text).split()).replace("`", "'").replace("|", "\\|")


def md_fence(text: str) -> str:
    """A backtick fence longer than any run of backticks in ``text``, so the text cannot close it."""
    longest = max((len(run) for run in re.findall(r"`+", text)), default=0)
    return "`" * max(3, longest + 1)


def size_category(rows: int) -> str:
    return next((label for bound, label in SIZE_CATEGORIES if rows < bound), "n>1T")


FAILURES_TEXT = "every row any stage dropped, with its stage, reason code and detail"  # the `failures` config
TRL_TEXT = ("the `final` samples in TRL's shape: `messages` (typed parts, no `<image>` token) and `images` "
            "(embedded); trains with TRL's `SFTTrainer` as it is")  # the `trl` config


def _front_matter(configs: list[dict], settings: CardSettings, run_name: str) -> str:
    from huggingface_hub import DatasetCardData

    entries = []
    for config in configs:
        entry = {
            "config_name": config["name"],
            "data_files": [{"split": "train", "path": f"{config['name']}/train-*.parquet"}],
        }
        if config["name"] == "final":
            entry["default"] = True
        entries.append(entry)
    infos = [{"config_name": c["name"], **c["info"]} for c in configs if "info" in c]
    rows = next((c["rows"] for c in configs if c["name"] == "final"), 0)
    extra = {k: v for k, v in (("license_name", settings.license_name), ("license_link", settings.license_link)) if v}
    data = DatasetCardData(
        license=settings.license, language=list(settings.language), task_categories=list(settings.task_categories),
        size_categories=[size_category(rows)], tags=list(settings.tags),
        pretty_name=settings.pretty_name or f"TaskGalaxy-style instruction data ({run_name})",
        configs=entries, dataset_info=infos, **extra)
    return "---\n" + data.to_yaml() + "\n---\n"


def card_settings(run_dir: Path) -> tuple[CardSettings, str]:
    """The run's ``card`` section (defaults where the run's config has none) and its run name."""
    data = read_config_data(Path(run_dir) / "config.yaml")
    return CardSettings.model_validate(data.get("card") or {}), str((data.get("run") or {}).get("name") or "run")


def render_card(run_dir: Path, configs: list[dict], states: list[dict], *, stages: Sequence[Stage] = (),
                browser: bool = False) -> str:
    """``stages``: the pipeline's stages, whose ``description`` says what each config holds. ``browser``: the
    layout holds the static sample browser (``browser/index.html``)."""
    holds = {stage.name: stage.description for stage in stages} | {"failures": FAILURES_TEXT, "trl": TRL_TEXT}
    config_text = (Path(run_dir) / "config.yaml")
    settings, run_name = card_settings(run_dir)
    title = settings.pretty_name or "TaskGalaxy-style instruction-tuning data"
    lines = [
        _front_matter(configs, settings, run_name),
        f"# {md_text(title)}",
        "",
        "Built with the TaskGalaxy builder: a task taxonomy grown by an LLM, images matched to task types by "
        "CLIP and filtered by GPT-4o, questions and answers written by GPT-4o, kept by a vote of VLM referees.",
        "",
        "## Configs",
        "",
        "| config | rows | what it holds | load it |",
        "|---|---:|---|---|",
    ]
    for config in configs:
        name = config["name"]
        lines.append(f"| `{md_code(name)}` | {config['rows']:,} | {holds.get(name, '')} | "
                     f"`load_dataset(REPO, \"{md_code(name)}\", split=\"train\")` |")
    lines += ["", "## What each stage did", "",
              "| stage | rows in | rows out | failed (by reason) | items rejected | tokens | cost $ | fingerprint |",
              "|---|---:|---:|---|---|---:|---:|---|"]
    total_cost, cached, prompt = 0.0, 0, 0
    for state in states:
        totals = state["totals"]
        usage = totals.get("usage", {})
        cost = float(usage.get("cost_usd", 0.0))
        total_cost += cost
        cached += int(usage.get("cached_tokens", 0))
        prompt += int(usage.get("prompt_tokens", 0))
        tokens = int(usage.get("prompt_tokens", 0) + usage.get("completion_tokens", 0))
        lines.append(
            f"| {md_text(state['stage'])} | {state['rows_in']:,} | {totals['rows_out']:,} | "
            f"{md_text(_reasons(totals['failed']))} | {md_text(_reasons(totals['item_failures']))} | {tokens:,} | "
            f"{cost:.2f} | `{md_code(state['fingerprint'][:12])}` |"
        )
    lines += ["", f"Total API cost: ${total_cost:.2f}.", ""]
    if cached:  # only when the provider's prompt cache served some: a card without it reads as before
        lines[-1:] = [f"Of {prompt:,} prompt tokens, {cached:,} ({cached / prompt:.1%}) were read from the "
                      "provider's prompt cache and billed at its cached-input price.", ""]
    for section in sorted(Path(run_dir).glob("[0-9][0-9]_*/card.md")):
        lines += [section.read_text(encoding="utf-8").rstrip(), ""]
    lines += _audit_section(run_dir)
    plots = sorted(p.name for p in Path(run_dir).glob("[0-9][0-9]_*/*.png"))
    if plots:
        lines += ["## Plots", ""] + [f"![{md_text(p)}](plots/{quote(p)})" for p in plots] + [""]
    lines += [
        "## LLaVA format", "",
        "`llava/taskgalaxy_llava.json` holds the `final` samples as LLaVA records "
        "(`id`, `image`, `task_type`, `conversations`); `llava/tasktype.txt` lists the task types.", "",
    ]
    if any(c["name"] == "trl" for c in configs):
        lines += _trl_section()
    if browser:
        lines += ["## Browse the samples", "",
                  "`browser/index.html` is a static page (no network, no server): download it and open the file "
                  "in a browser to see the published samples' images, task paths, questions, answers and votes, "
                  "filtered by category or task type or searched as text.", ""]
    if config_text.exists():
        text = config_text.read_text(encoding="utf-8").rstrip()
        lines += ["## Config", "", f"{md_fence(text)}yaml", text, md_fence(text), ""]
    return "\n".join(lines)


def _audit_section(run_dir: Path) -> list[str]:
    """"Human audit": the figures of ``taskgalaxy audit RUN --labels FILE`` when the run has them, else nothing."""
    from processors.quality.audit_text import card_section

    return card_section(run_dir, md_text)


def _trl_section() -> list[str]:
    return [
        "## Train with TRL", "",
        "The `trl` config is what TRL's `SFTTrainer` reads for a vision-language model: each row's `messages` "
        "is a user turn (an `{\"type\": \"image\"}` part, then the question as a text part) and an assistant "
        "turn (the answer), and `images` holds the image itself, embedded, so nothing else needs downloading. "
        "Give it to the trainer as it is, with the model's processor:", "",
        "```python",
        "from datasets import load_dataset",
        "from trl import SFTConfig, SFTTrainer",
        "",
        "train = load_dataset(REPO, \"trl\", split=\"train\")",
        "trainer = SFTTrainer(model=MODEL, args=SFTConfig(output_dir=\"out\"), train_dataset=train)",
        "trainer.train()",
        "```", "",
    ]


def _reasons(counts: dict) -> str:
    return ", ".join(f"{k}={v}" for k, v in sorted(counts.items(), key=lambda kv: -kv[1])) or "—"
