"""Fold parsed replies into the tree: exact and semantic sibling dedup, the per-parent cap, and rejections.

Every candidate that does not become a node is returned as a ``Rejection`` with a reason, attributed to the
input row that owns the parent, so the stage can record it as an item failure:
``duplicate`` (same key as an existing sibling), ``near_duplicate`` (cosine >= threshold with a sibling; the
detail names it: that is the merge report), ``over_limit`` (the parent already has ``Ask.cap`` children).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from loaders.taxonomy.names import name_key
from processors.taxonomy.dedup import SemanticDeduper
from processors.taxonomy.parse import ParsedReply
from processors.taxonomy.tree import Node, Tree


@dataclass(frozen=True)
class Rejection:
    owner: str
    line: str
    reason: str
    detail: str


@dataclass
class Ask:
    """One request's worth of context: the parent, who owns what it adds, names it must not repeat."""

    parent: Node
    owner: str
    cap: int  # the most children the parent may have
    reserved: tuple[str, ...] = ()  # names that count as existing siblings, wherever they live

    def existing(self) -> list[str]:
        """Reserved names first, then the parent's other children: the order the prompt lists them in.

        Reserved names come first so that the prompt does not depend on which of them this batch holds.
        """
        keys = {name_key(n) for n in self.reserved}
        return [*self.reserved, *(n for n in self.parent.child_names() if name_key(n) not in keys)]


def merge_round(
    tree: Tree,
    asks: Sequence[Ask],
    replies: Sequence[ParsedReply | None],
    *,
    round: int,
    deduper: SemanticDeduper | None,
) -> tuple[int, list[Rejection]]:
    """Add the surviving names of each reply (None = the request failed); returns (added, rejections)."""
    rejections: list[Rejection] = []
    candidates: list[list[str]] = []
    for ask, reply in zip(asks, replies):
        fresh = []
        existing = {name_key(n): n for n in ask.existing()}
        for name in reply.names if reply else ():
            if name_key(name) in existing:
                rejections.append(_reject(ask, name, "duplicate", f"already listed as {existing[name_key(name)]!r}"))
            else:
                fresh.append(name)
        candidates.append(fresh)
    near = deduper.near_duplicates([(a.existing(), c) for a, c in zip(asks, candidates)]) if deduper else None
    added = 0
    for index, (ask, fresh) in enumerate(zip(asks, candidates)):
        for position, name in enumerate(fresh):
            if near and position in near[index]:
                twin, score = near[index][position]
                rejections.append(_reject(ask, name, "near_duplicate", f"merged into {twin!r} (cosine {score})"))
            elif len(ask.existing()) >= ask.cap:
                rejections.append(_reject(ask, name, "over_limit", f"parent already has {ask.cap} children"))
            elif tree.add_child(ask.parent, name, origin="generated", round=round, owner=ask.owner):
                added += 1
    return added, rejections


def _reject(ask: Ask, name: str, reason: str, detail: str) -> Rejection:
    where = ask.parent.path or "(first level)"
    return Rejection(ask.owner, name, reason, f"under {where}: {detail}")
