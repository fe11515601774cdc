"""``taskgalaxy status``: what each stage of a run folder has done, as a table or as JSON."""

from __future__ import annotations

from pathlib import Path

from builder import runfolder as rf
from builder.outputs import damaged_shards, run_states, stage_totals, stale_inputs

TOKEN_COUNTERS = ("prompt_tokens", "completion_tokens")


def stage_summaries(run_dir: Path) -> list[dict]:
    """One plain dict per stage: shards, rows, failures by reason, tokens, cost, fingerprint, done."""
    summaries = []
    for state in run_states(run_dir):
        # Totals from the folder itself, not only state.json: a kill or a full disk may have left that stale,
        # and the spend records of stopped attempts must show in any case.
        totals = stage_totals(Path(run_dir) / state["folder"], state.get("shards_total", 0))
        usage = totals.get("usage", {})
        summary = {
            "stage": state["stage"],
            "folder": state["folder"],
            "done": bool(state.get("done")),
            "shards_done": totals["shards_done"],
            "shards_total": state.get("shards_total", 0),
            "rows_in": state.get("rows_in", 0),
            "rows_processed": totals["rows_in"],
            "rows_out": totals["rows_out"],
            "inputs_with_output": totals["inputs_with_output"],
            "failed": sum(totals["failed"].values()),
            "failures_by_reason": totals["failed"],
            "item_failures_by_reason": totals["item_failures"],
            "tokens": int(sum(usage.get(name, 0) for name in TOKEN_COUNTERS)),
            "requests": int(usage.get("requests", 0)),
            "cache_hits": int(usage.get("cache_hits", 0)),
            # prompt tokens the provider read from its prompt cache (billed at the cached price); a run folder
            # from before the counter existed reads 0
            "cached_tokens": int(usage.get("cached_tokens", 0)),
            "cost_usd": round(float(usage.get("cost_usd", 0.0)), 4),
            "usage": usage,
            "stopped_usage": totals.get("stopped_usage", {}),
            "fingerprint": state["fingerprint"],
            "stale_inputs": stale_inputs(run_dir, state),
            "damaged_shards": [f"shard {index}: {why}" for index, why in damaged_shards(run_dir, state["stage"])],
            # wall-clock time with a shard of the stage running; shard_seconds adds up each shard's own time
            "seconds": round(totals.get("seconds", 0.0), 2),
            "shard_seconds": round(totals.get("shard_seconds", 0.0), 2),
            # rows a server did not answer when the stage last stopped on them (builder.runner.UnansweredError)
            "unanswered": {} if state.get("done") else dict(state.get("unanswered") or {}),
        }
        extra = rf.read_json(Path(run_dir) / state["folder"] / "stats.json")
        if extra is not None:
            summary["stats"] = extra
        summaries.append(summary)
    return summaries


def format_table(run_dir: Path, summaries: list[dict]) -> str:
    if not summaries:
        return f"{run_dir}: no stage has run yet"
    header = f"{'stage':<10} {'shards':>9} {'in':>8} {'out':>8} {'failed':>7} {'tokens':>10} {'cost $':>9}  done  fingerprint"
    lines = [f"run folder: {run_dir}", header, "-" * len(header)]
    for s in summaries:
        shards = f"{s['shards_done']}/{s['shards_total']}"
        lines.append(
            f"{s['stage']:<10} {shards:>9} {s['rows_in']:>8} {s['rows_out']:>8} {s['failed']:>7} "
            f"{s['tokens']:>10} {s['cost_usd']:>9.2f}  {_done(s):<5} {s['fingerprint'][:12]}"
        )
        if s.get("unanswered"):
            lines.append(f"{'':<10} unanswered: {sum(s['unanswered'].values())} rows a server could not answer "
                         f"({', '.join(f'{k}={v}' for k, v in sorted(s['unanswered'].items()))}); not judged: "
                         "rerun the same command to ask them again")
        for damage in s["damaged_shards"]:
            lines.append(f"{'':<10} damaged: {damage}; a rerun recomputes it")
        if s["stale_inputs"]:
            lines.append(f"{'':<10} stale: computed from an older {', '.join(s['stale_inputs'])}; rerun to update")
        if s.get("cached_tokens"):
            prompt = int(s["usage"].get("prompt_tokens", 0))
            share = f" ({100 * s['cached_tokens'] / prompt:.1f} %)" if prompt else ""
            lines.append(f"{'':<10} cached input: {s['cached_tokens']} of {prompt} prompt tokens{share}")
        stopped = s["stopped_usage"]
        if stopped.get("requests"):
            lines.append(f"{'':<10} includes {int(stopped['requests'])} requests (${stopped.get('cost_usd', 0):.2f}) "
                         "paid by attempts that stopped or by an earlier config")
        for label, counts in (("failed", s["failures_by_reason"]), ("items rejected", s["item_failures_by_reason"])):
            if counts:
                reasons = ", ".join(f"{reason}={n}" for reason, n in sorted(counts.items(), key=lambda kv: -kv[1]))
                lines.append(f"{'':<10} {label}: {reasons}")
        # A stage's own report lines (e.g. final's coverage and referee agreement): shown, not interpreted.
        for line in (s.get("stats") or {}).get("summary", []) if isinstance(s.get("stats"), dict) else []:
            if isinstance(line, str):
                lines.append(f"{'':<10} {line}")
    total_cost = sum(s["cost_usd"] for s in summaries)
    lines.append(f"total cost so far: ${total_cost:.2f}")
    return "\n".join(lines)


def _done(summary: dict) -> str:
    if summary["damaged_shards"]:
        return "no"
    if summary["stale_inputs"]:
        return "stale"
    return "yes" if summary["done"] else "no"
