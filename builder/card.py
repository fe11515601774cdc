"""The dataset card (README.md) of a published run: YAML configs, counts, failures, cost, how to load."""

from __future__ import annotations

from pathlib import Path

import yaml


STAGE_TEXT = {
    "taxonomy": "the task-type tree (one row per task type; leaves are the task types)",
    "images": "the collected, validated, deduplicated images (embedded)",
    "match": "each image's top-k task types by CLIP similarity",
    "filter": "the task types GPT-4o kept for each image",
    "qa": "one generated question and answer per image and task type",
    "score": "referee votes and p(yes) per question",
    "final": "the kept samples in LLaVA form, images embedded (the default config)",
    "failures": "every row any stage dropped, with its stage, reason code and detail",
}


def _front_matter(configs: list[dict]) -> str:
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
    meta = {"configs": entries, "dataset_info": infos, "tags": ["taskgalaxy", "multimodal", "instruction-tuning"],
            "task_categories": ["visual-question-answering"]}
    return "---\n" + yaml.safe_dump(meta, sort_keys=False) + "---\n"


def render_card(run_dir: Path, configs: list[dict], states: list[dict]) -> str:
    config_text = (Path(run_dir) / "config.yaml")
    lines = [
        _front_matter(configs),
        "# TaskGalaxy-style instruction-tuning data",
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
        lines.append(f"| `{name}` | {config['rows']:,} | {STAGE_TEXT.get(name, '')} | "
                     f"`load_dataset(REPO, \"{name}\", split=\"train\")` |")
    lines += ["", "## What each stage did", "",
              "| stage | rows in | rows out | failed (by reason) | items rejected | tokens | cost $ | fingerprint |",
              "|---|---:|---:|---|---|---:|---:|---|"]
    total_cost = 0.0
    for state in states:
        totals = state["totals"]
        usage = totals.get("usage", {})
        cost = float(usage.get("cost_usd", 0.0))
        total_cost += cost
        tokens = int(usage.get("prompt_tokens", 0) + usage.get("completion_tokens", 0))
        lines.append(
            f"| {state['stage']} | {state['rows_in']:,} | {totals['rows_out']:,} | {_reasons(totals['failed'])} | "
            f"{_reasons(totals['item_failures'])} | {tokens:,} | {cost:.2f} | `{state['fingerprint'][:12]}` |"
        )
    lines += ["", f"Total API cost: ${total_cost:.2f}.", ""]
    plots = sorted(p.name for p in Path(run_dir).glob("[0-9][0-9]_*/*.png"))
    if plots:
        lines += ["## Plots", ""] + [f"![{p}](plots/{p})" for p in plots] + [""]
    lines += [
        "## LLaVA format", "",
        "`llava/taskgalaxy_llava.json` holds the `final` samples as LLaVA records "
        "(`id`, `image`, `task_type`, `conversations`); `llava/tasktype.txt` lists the task types.", "",
    ]
    if config_text.exists():
        lines += ["## Config", "", "```yaml", config_text.read_text(encoding="utf-8").rstrip(), "```", ""]
    return "\n".join(lines)


def _reasons(counts: dict) -> str:
    return ", ".join(f"{k}={v}" for k, v in sorted(counts.items(), key=lambda kv: -kv[1])) or "—"
