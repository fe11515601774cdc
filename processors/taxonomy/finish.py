"""What the taxonomy stage leaves beside its shards once every shard is done (idempotent).

``tasktype.txt`` (leaf paths, ``~``-joined, in output order), ``stats.json`` (tree statistics, growth per
round, rejected lines by reason, seed-file notes) and, unless disabled, ``sunburst.html`` + ``sunburst.png``.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from typing import TYPE_CHECKING

from builder.runfolder import atomic_write_json, read_json
from loaders.taxonomy.names import SEPARATOR
from loaders.taxonomy.tasktypes import TASKTYPE_FILE, write_tasktypes
from processors.taxonomy.stats import format_stats, tree_stats

if TYPE_CHECKING:
    import datasets

    from builder.stage import StageContext

logger = logging.getLogger(__name__)

STATS_FILE = "stats.json"
HTML_FILE = "sunburst.html"
PNG_FILE = "sunburst.png"


def write_outputs(ctx: "StageContext", output: "datasets.Dataset", *, plots: bool) -> dict:
    from builder.outputs import column_values, load_stage_failures

    paths = [tuple(path.split(SEPARATOR)) for path in column_values(output, "path")]
    folder = ctx.stage_dir
    write_tasktypes(folder / TASKTYPE_FILE, paths)
    stats = tree_stats(paths, column_values(output, "origin"))
    failures = load_stage_failures(ctx.run_dir, "taxonomy")
    item_reasons = [r for r, item in zip(column_values(failures, "reason"), column_values(failures, "item"))
                    if item is not None]
    stats["rejected_by_reason"] = dict(Counter(item_reasons).most_common())
    stats["growth"] = [read_json(p) for p in sorted((folder / "growth").glob("*.json"))]
    stats["seed_files"] = read_json(folder / "seeds-report.json") or {}
    atomic_write_json(folder / STATS_FILE, stats)
    logger.info("taxonomy: %s", format_stats(stats))
    if plots and paths:
        from processors.taxonomy.plots import write_sunburst_html, write_sunburst_png

        started = time.monotonic()
        title = f"Task taxonomy: {stats['leaves']} task types, {stats['first_level']} first-level categories"
        html_sectors = write_sunburst_html(folder / HTML_FILE, paths, title)
        png_sectors = write_sunburst_png(folder / PNG_FILE, paths, title)
        logger.info("taxonomy: sunburst written in %.1f s (%d sectors in the HTML, %d in the PNG)",
                    time.monotonic() - started, html_sectors, png_sectors)
    return stats
