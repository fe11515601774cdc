"""The quality report in words: short lines for ``taskgalaxy status`` and a Markdown section for the card."""

from __future__ import annotations

from processors.publish.card import md_code, md_text

STAGES = ("match", "filter", "qa", "score", "final")


def cell(text) -> str:
    """Text shown as itself inside a Markdown table cell (category and referee names come from a model or a
    config): a ``|`` would start a new cell, a newline end the row, ``<script>`` or ``[x](...)`` be markup.
    See ``processors.publish.card.md_text``."""
    return md_text(text)


def _k(value) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def checks_run(final: dict) -> dict[str, int]:
    """What each check that ran rejected, 0 included; a plan written before ``checks_run`` was recorded
    shows the checks that rejected something (which ran was not written down)."""
    rejected = final.get("rejected_by_check", {})
    if "checks_run" in final:
        return {name: rejected.get(name, 0) for name in final["checks_run"]}
    return {name: n for name, n in rejected.items() if n}


def summary_lines(stats: dict) -> list[str]:
    lines = []
    final = stats.get("final", {})
    if final:
        rejected = checks_run(final)
        sel = final.get("selection", {})
        lines.append(f"kept {final.get('kept')} of {final.get('scored')} scored; the paper's protocol keeps "
                     f"{final.get('protocol_kept')}" + (f"; checks reject {rejected}" if rejected else ""))
        if sel.get("target_total") or sel.get("per_task_max"):
            lines.append(f"balanced selection: {sel.get('kept')} of {sel.get('eligible')} eligible "
                         f"(target {sel.get('target_total')}, shortfall {sel.get('shortfall')}), dropped "
                         f"{sel.get('dropped_by_reason')}")
    coverage = stats.get("coverage")
    if coverage:
        parts = []
        for stage in STAGES:
            s = coverage["stages"].get(stage)
            if s:
                parts.append(f"{stage} {s['leaves_covered']}")
        final_cov = coverage["stages"].get("final", {})
        lines.append(f"coverage: leaves with rows, of {coverage['leaves']}: " + ", ".join(parts)
                     + (f"; head (top 1% of leaves) holds {final_cov.get('head_share_top1pct', 0):.0%} of final"
                        if final_cov else ""))
    agreement = stats.get("agreement")
    if agreement:
        overall = agreement["overall"]
        pairs = ", ".join(f"{pair}={_k(k)}" for pair, k in overall["cohen_kappa"].items())
        lines.append(f"referees: Fleiss kappa {_k(overall['fleiss_kappa'])}; Cohen {pairs}"
                     + (" (referee cascade: each pair over the questions both were asked)"
                        if agreement.get("note") else ""))
        lines.append("vote patterns: " + ", ".join(f"{p}={n}" for p, n in overall["patterns"].items())
                     + "; yes-rate " + ", ".join(f"{r}={_k(v)}" for r, v in overall["yes_rate"].items()))
    return lines


def _coverage_table(coverage: dict) -> list[str]:
    levels = sorted({lvl for s in coverage["stages"].values() for lvl in s["nodes_covered_by_level"]}, key=int)
    head = "| stage | rows | leaves covered | empty leaves | head share (top 1 %) | " + \
        " | ".join(f"level-{lvl} nodes covered" for lvl in levels) + " |"
    lines = [head, "|---|---:|---:|---:|---:|" + "---:|" * len(levels)]
    for stage in STAGES:
        s = coverage["stages"].get(stage)
        if not s:
            continue
        cells = [f"{s['nodes_covered_by_level'].get(lvl, {}).get('covered', 0)}/"
                 f"{s['nodes_covered_by_level'].get(lvl, {}).get('nodes', 0)}" for lvl in levels]
        lines.append(f"| {stage} | {s['rows']:,} | {s['leaves_covered']:,}/{coverage['leaves']:,} | "
                     f"{s['leaves_empty']:,} | {s['head_share_top1pct']:.1%} | " + " | ".join(cells) + " |")
    final = coverage["stages"].get("final")
    if final:
        lines += ["", "Samples per leaf task type in `final`: " +
                  ", ".join(f"{b}: {n:,} leaves" for b, n in final["histogram"].items()) + "."]
    return lines


def _agreement_table(agreement: dict) -> list[str]:
    names = agreement["referees"]
    overall = agreement["overall"]
    patterns = list(overall["patterns"])
    lines = ["| scope | rows | " + " | ".join(f"yes-rate {cell(n)}" for n in names) + " | Fleiss κ | "
             + " | ".join(f"κ {cell(p)}" for p in overall["cohen_kappa"]) + " | " + " | ".join(patterns) + " |"]
    lines.append("|---|---:|" + "---:|" * (len(names) + 1 + len(overall["cohen_kappa"]) + len(patterns)))
    for scope, report in [("all", overall), *agreement["by_category"].items()]:
        lines.append(f"| {cell(scope)} | {report['rows']:,} | " + " | ".join(_k(report["yes_rate"][n]) for n in names)
                     + f" | {_k(report['fleiss_kappa'])} | "
                     + " | ".join(_k(k) for k in report["cohen_kappa"].values()) + " | "
                     + " | ".join(str(report["patterns"][p]) for p in patterns) + " |")
    return lines


def card_section(stats: dict) -> str:
    lines = ["## Quality", ""]
    final = stats.get("final", {})
    if final:
        lines += [f"The paper's protocol (referee votes at the threshold) keeps {final['protocol_kept']:,} of "
                  f"{final['scored']:,} scored questions; {final['kept']:,} are published.", "",
                  "| check | protocol-kept samples it rejects |", "|---|---:|"]
        lines += [f"| `{md_code(reason)}` | {n:,} |" for reason, n in final.get("rejected_by_check", {}).items()]
        sel = final.get("selection", {})
        lines += [f"| balanced selection (`balance_cap`, `balance_target`) | "
                  f"{sum(sel.get('dropped_by_reason', {}).values()):,} |", ""]
    if stats.get("coverage"):
        lines += ["### Task coverage", "", f"{stats['coverage']['leaves']:,} leaf task types; how many carry "
                  "rows at each stage (a match candidate, a kept label, a question, a sample):", ""]
        lines += _coverage_table(stats["coverage"]) + [""]
        lines += ["Per-leaf counts: `reports/coverage_per_leaf.csv`.", ""]
    if stats.get("agreement"):
        lines += ["### Referee agreement", "", "Yes-rate per referee, Fleiss' κ, pairwise Cohen's κ and the "
                  "count of each vote pattern (yes votes of all referees), overall and per first-level category:",
                  ""]
        if stats["agreement"].get("note"):  # the referee cascade: kappas over the questions both were asked
            lines += [f"Note: {stats['agreement']['note']}.", ""]
        lines += _agreement_table(stats["agreement"]) + [""]
    return "\n".join(lines) + "\n"
