"""Pictures of the taxonomy: an interactive sunburst (self-contained HTML) and a static PNG.

The HTML embeds plotly.js (~4.6 MB) so it opens offline in any browser; click a wedge to zoom into it. The
PNG is drawn with matplotlib on the Agg backend (no display, no browser): one ring per level, wedge angle
proportional to the number of leaf task types below, one hue per first-level category. Both are written
atomically. plotly and matplotlib are imported only here, only when called.
"""

from __future__ import annotations

import colorsys
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from builder.runfolder import atomic_write_bytes
from loaders.taxonomy.names import join_path, name_key

logger = logging.getLogger(__name__)

LABEL_MIN_SHARE = 0.012  # first-level wedges smaller than this share of the circle get no label in the PNG


@dataclass
class _Node:
    name: str
    path: str
    depth: int
    leaves: int = 0
    children: dict[str, "_Node"] = field(default_factory=dict)


def build_hierarchy(leaf_paths: Sequence[Sequence[str]]) -> _Node:
    root = _Node("", "", 0)
    for parts in leaf_paths:
        node = root
        node.leaves += 1
        for depth, part in enumerate(parts, start=1):
            key = name_key(part)
            if key not in node.children:
                node.children[key] = _Node(part, join_path(parts[:depth]), depth)
            node = node.children[key]
            node.leaves += 1
    return root


def _walk(node: _Node):
    for child in node.children.values():
        yield node, child
        yield from _walk(child)


def write_sunburst_html(path: Path, leaf_paths: Sequence[Sequence[str]], title: str) -> None:
    import plotly.graph_objects as go

    root = build_hierarchy(leaf_paths)
    ids, labels, parents, values = [], [], [], []
    for parent, node in _walk(root):
        ids.append(node.path)
        labels.append(node.name)
        parents.append(parent.path)
        values.append(node.leaves)
    figure = go.Figure(
        go.Sunburst(
            ids=ids, labels=labels, parents=parents, values=values, branchvalues="total", maxdepth=3,
            insidetextorientation="radial", hovertemplate="%{id}<br>%{value} task types<extra></extra>",
        )
    )
    figure.update_layout(title=title, margin=dict(t=50, l=0, r=0, b=0), height=900)
    html = figure.to_html(include_plotlyjs=True, full_html=True)
    atomic_write_bytes(Path(path), html.encode("utf-8"))


def write_sunburst_png(path: Path, leaf_paths: Sequence[Sequence[str]], title: str, *, dpi: int = 110) -> None:
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    root = build_hierarchy(leaf_paths)
    total = max(root.leaves, 1)
    figure = plt.figure(figsize=(10, 10), dpi=dpi)
    axes = figure.add_subplot(projection="polar")
    bars = {"x": [], "width": [], "bottom": [], "color": []}
    labels = []
    start = 0.0
    firsts = list(root.children.values())
    for index, first in enumerate(firsts):
        hue = index / max(len(firsts), 1)
        _wedges(first, start, total, hue, bars)
        share = first.leaves / total
        if share >= LABEL_MIN_SHARE:
            labels.append((start + math.pi * share, first.name, share))
        start += 2 * math.pi * share
    axes.bar(bars["x"], 1.0, width=bars["width"], bottom=bars["bottom"], color=bars["color"],
             edgecolor="white", linewidth=0.15, align="edge")
    for angle, name, share in labels:
        degrees = math.degrees(angle) % 360
        rotation = degrees - 180 if 90 < degrees < 270 else degrees  # radial, never upside down
        axes.text(angle, 0.8, name[:26], ha="center", va="center", fontsize=6, rotation=rotation,
                  rotation_mode="anchor")
    axes.set_axis_off()
    axes.set_title(title, fontsize=11)
    from io import BytesIO

    buffer = BytesIO()
    figure.savefig(buffer, format="png", bbox_inches="tight")
    plt.close(figure)
    atomic_write_bytes(Path(path), buffer.getvalue())


def _wedges(node: _Node, start: float, total: int, hue: float, bars: dict) -> None:
    width = 2 * math.pi * node.leaves / total
    lightness = min(0.35 + 0.13 * node.depth, 0.85)
    bars["x"].append(start)
    bars["width"].append(width)
    bars["bottom"].append(float(node.depth - 1) + 0.3)
    bars["color"].append(colorsys.hls_to_rgb(hue, lightness, 0.65))
    for child in node.children.values():
        _wedges(child, start, total, hue, bars)
        start += 2 * math.pi * child.leaves / total
