"""Pictures of the taxonomy: an interactive sunburst (self-contained HTML) and a static PNG.

The HTML embeds plotly.js (~4.6 MB) so it opens offline in any browser; click a wedge to zoom into it. The
PNG is drawn with matplotlib on the Agg backend (no display, no browser): one ring per level, wedge angle
proportional to the number of leaf task types below, one hue per first-level category. Both are written
atomically. plotly and matplotlib are imported only here, only when called.

Both draw a bounded number of sectors (``MAX_HTML_SECTORS``, ``MAX_PNG_SECTORS``): whole levels from the top
while they fit, then, of the next level, the children of its widest parents (``drawn_sectors``); the figure
says what was left out. Unbounded, a 200,000-leaf tree took 322 s for the PNG alone (now ~5 s), most of it
spent on wedges narrower than a pixel.

Names are text, not markup: plotly reads ``<b>``, ``<a href>`` and entities in labels, matplotlib reads
``$...$`` as mathematics; both are escaped here.
"""

from __future__ import annotations

import colorsys
import html
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from builder.runfolder import atomic_write_bytes
from loaders.taxonomy.names import join_path, name_key

logger = logging.getLogger(__name__)

LABEL_MIN_SHARE = 0.012  # first-level wedges smaller than this share of the circle get no label in the PNG
MAX_PNG_SECTORS = 2_500  # the outer ring is ~2,500 px around at 10 in x 110 dpi: more would be sub-pixel
# A tree of the paper's size (~19k task types) is drawn whole; plotly shows three levels at a time, and the
# page of a 200k-leaf tree drawn whole is 36 MB.
MAX_HTML_SECTORS = 50_000


@dataclass
class _Node:
    name: str
    path: str
    depth: int
    leaves: int = 0
    children: dict[str, "_Node"] = field(default_factory=dict)


def build_hierarchy(leaf_paths: Sequence[Sequence[str]]) -> _Node:
    root = _Node("", "", 0)
    keys: dict[str, str] = {}  # an upper level's name recurs once per leaf below it: normalise it once
    for parts in leaf_paths:
        node = root
        node.leaves += 1
        for depth, part in enumerate(parts, start=1):
            key = keys.get(part)
            if key is None:
                key = keys[part] = name_key(part)
            if key not in node.children:
                node.children[key] = _Node(part, join_path(parts[:depth]), depth)
            node = node.children[key]
            node.leaves += 1
    return root


@dataclass(frozen=True)
class Drawn:
    """The sectors a figure draws: ``pairs`` (parent, node), parents before children, in tree order;
    ``sectors`` the tree's count (every node but the root); ``note`` what was left out ("" if nothing)."""

    pairs: list[tuple[_Node, _Node]]
    sectors: int
    note: str


def drawn_sectors(root: _Node, cap: int, *, min_share: float = 0.0) -> Drawn:
    """At most ``cap`` sectors: whole levels from the top while they fit; of the first level that does not,
    the children of its widest parents (most leaves below), all of a parent's children or none, while they
    fit, so a wedge shows its whole breakdown or none of it; nothing below that level. ``min_share``: that
    partial level leaves out children narrower, on average, than this share of the circle (a picture that
    cannot zoom). A tree with more than ``cap`` first-level categories: the widest of them. Parents come
    before children, siblings in tree order."""
    chosen: list[tuple[_Node, _Node]] = []
    parents, depth = [root], 0
    while True:
        level = [(parent, child) for parent in parents for child in parent.children.values()]
        if not level:
            return Drawn(chosen, len(chosen), "")
        if len(chosen) + len(level) > cap:
            break
        chosen += level
        depth += 1
        parents = [child for _, child in level]
    if depth == 0:
        widest = sorted(sorted(range(len(level)), key=lambda i: -level[i][1].leaves)[:cap])
        partial = [level[i] for i in widest]
        part = f"level 1: its {len(partial):,} widest of {len(level):,} sectors"
    else:
        room, grown = cap - len(chosen), set()
        for parent in sorted(parents, key=lambda node: -node.leaves):
            if 0 < len(parent.children) <= room and parent.leaves >= min_share * root.leaves * len(parent.children):
                grown.add(id(parent))
                room -= len(parent.children)
        partial = [pair for pair in level if id(pair[0]) in grown]
        part = f"level {depth + 1}: only below the {len(grown):,} widest of its {len(parents):,} parents"
    chosen += partial
    full = f"levels 1-{depth} in full" if depth > 1 else ("level 1 in full" if depth else "")
    deeper = not partial or any(child.children for _, child in level)
    rest = f"level {depth + 1 + bool(partial)} and below not drawn" if deeper else ""
    total = _count(root)
    note = "; ".join(p for p in (full, part if partial else "", rest) if p)
    return Drawn(chosen, total, f"{len(chosen):,} of {total:,} sectors drawn ({note})")


def _count(node: _Node) -> int:
    stack, count = [node], -1  # the root is no sector
    while stack:
        current = stack.pop()
        count += 1
        stack.extend(current.children.values())
    return count


def write_sunburst_html(path: Path, leaf_paths: Sequence[Sequence[str]], title: str, *,
                        max_sectors: int = MAX_HTML_SECTORS) -> int:
    """Write the interactive sunburst; returns the number of sectors drawn (at most ``max_sectors``)."""
    import plotly.graph_objects as go

    drawn = drawn_sectors(build_hierarchy(leaf_paths), max_sectors)
    ids, labels, parents, values = [], [], [], []
    for parent, node in drawn.pairs:  # escaped: plotly reads <b>, <a href=...> and &entities; in text
        ids.append(html.escape(node.path))
        labels.append(html.escape(node.name))
        parents.append(html.escape(parent.path))
        values.append(node.leaves)
    figure = go.Figure(
        go.Sunburst(
            ids=ids, labels=labels, parents=parents, values=values, branchvalues="total", maxdepth=3,
            insidetextorientation="radial", hovertemplate="%{id}<br>%{value} task types<extra></extra>",
        )
    )
    heading = html.escape(title) + (f"<br><sub>{html.escape(drawn.note)}</sub>" if drawn.note else "")
    figure.update_layout(title=heading, margin=dict(t=70 if drawn.note else 50, l=0, r=0, b=0), height=900)
    page = figure.to_html(include_plotlyjs=True, full_html=True)
    atomic_write_bytes(Path(path), page.encode("utf-8"))
    return len(drawn.pairs)


def _plain(text: str) -> str:
    """Text matplotlib draws as it is: an unescaped pair of ``$`` would be typeset as mathematics."""
    return text.replace("$", r"\$")


def write_sunburst_png(path: Path, leaf_paths: Sequence[Sequence[str]], title: str, *, dpi: int = 110,
                       max_sectors: int = MAX_PNG_SECTORS) -> int:
    """Write the static sunburst; returns the number of sectors drawn (at most ``max_sectors``)."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    root = build_hierarchy(leaf_paths)
    drawn = drawn_sectors(root, max_sectors, min_share=1 / max_sectors)
    total = max(root.leaves, 1)
    hue = {id(first): index / max(len(root.children), 1) for index, first in enumerate(root.children.values())}
    start = {id(root): 0.0}  # node -> angle where its wedge starts
    bars = {"x": [], "width": [], "bottom": [], "color": []}
    labels = []
    for parent, node in drawn.pairs:  # parents first, so the parent's start is known
        if id(node) not in start:  # place every child of the parent, drawn or not: a gap stays a gap
            angle = start[id(parent)]
            for child in parent.children.values():
                start[id(child)] = angle
                angle += 2 * math.pi * child.leaves / total
        if id(node) not in hue:
            hue[id(node)] = hue[id(parent)]
        width = 2 * math.pi * node.leaves / total
        bars["x"].append(start[id(node)])
        bars["width"].append(width)
        bars["bottom"].append(float(node.depth - 1) + 0.3)
        bars["color"].append(colorsys.hls_to_rgb(hue[id(node)], min(0.35 + 0.13 * node.depth, 0.85), 0.65))
        if node.depth == 1 and node.leaves / total >= LABEL_MIN_SHARE:
            labels.append((start[id(node)] + width / 2, node.name))
    figure = plt.figure(figsize=(10, 10), dpi=dpi)
    axes = figure.add_subplot(projection="polar")
    axes.bar(bars["x"], 1.0, width=bars["width"], bottom=bars["bottom"], color=bars["color"],
             edgecolor="white", linewidth=0.15, align="edge")
    for angle, name in labels:
        degrees = math.degrees(angle) % 360
        rotation = degrees - 180 if 90 < degrees < 270 else degrees  # radial, never upside down
        axes.text(angle, 0.8, _plain(name[:26]), ha="center", va="center", fontsize=6, rotation=rotation,
                  rotation_mode="anchor")
    axes.set_axis_off()
    axes.set_title(_plain(title), fontsize=11)
    if drawn.note:
        figure.text(0.5, 0.04, _plain(drawn.note), ha="center", fontsize=8, color="#555")
    from io import BytesIO

    buffer = BytesIO()
    figure.savefig(buffer, format="png", bbox_inches="tight")
    plt.close(figure)
    atomic_write_bytes(Path(path), buffer.getvalue())
    return len(bars["x"])
