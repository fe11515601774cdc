"""Level-by-level growth of the tree: new first-level categories, then children of every parent, per level.

For level L (1..``levels``) and round r (1..``rounds_per_level``): every node at level L-1 with room for
children (the invisible root at L=1, only when this batch owns the "new first-level" row) gets one ask —
``supplement`` when it has children, ``expand`` when it has none. All asks of a round go to the engine in one
``send`` call (so they run concurrently), then are merged in ask order. The level's rounds stop early when a
round adds fewer than ``min_round_gain`` x (nodes at level L before the round) — or nothing at all.

Everything here is deterministic given the replies, so a rerun after a crash builds the very same prompts and
the request cache answers every one of them already paid for.
"""

from __future__ import annotations

import functools
import logging
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, fields

from loaders.taxonomy.names import task_id
from processors.taxonomy import prompts
from processors.taxonomy.dedup import SemanticDeduper
from processors.taxonomy.merge import Ask, Rejection, merge_round
from processors.taxonomy.parse import NameLimits, ParsedReply, parse_or_raise
from processors.taxonomy.tree import Tree

logger = logging.getLogger(__name__)

Send = Callable[[list], list]  # list[LLMRequest] -> list[LLMResult], same order


@dataclass(frozen=True)
class GrowthPlan:
    """How far to grow: every field but ``limits`` and the two per-batch ones is the ``TaxonomyConfig`` field
    of the same name (``from_config``)."""

    levels: int = 3
    rounds_per_level: int = 2
    min_round_gain: float = 0.05
    new_first_level_per_round: int = 8
    max_first_level: int = 80
    children_per_request: int = 8
    max_children: int = 30
    limits: NameLimits = NameLimits()
    temperature: float | None = None
    max_tokens: int | None = None
    roots_owner: str | None = None  # the input row asking for new first-level categories, if in this batch
    reserved_roots: tuple[str, ...] = ()  # every seeded first-level name, in seed order (some in other shards)

    @classmethod
    def from_config(cls, config) -> "GrowthPlan":
        """The plan of a ``TaxonomyConfig`` (no batch's ``roots_owner`` / ``reserved_roots`` yet)."""
        named = {f.name: getattr(config, f.name) for f in fields(cls) if f.name in type(config).model_fields}
        return cls(**named, limits=NameLimits(max_chars=config.max_name_chars, max_words=config.max_name_words))


@dataclass
class GrowthReport:
    asks: int = 0
    asks_by_kind: Counter = field(default_factory=Counter)
    added: dict[str, list[int]] = field(default_factory=dict)  # "level N" -> nodes added per round
    rejections: list[Rejection] = field(default_factory=list)


def grow(tree: Tree, plan: GrowthPlan, send: Send, deduper: SemanticDeduper | None = None) -> GrowthReport:
    report = GrowthReport()
    for level in range(1, plan.levels + 1):
        added_per_round = report.added.setdefault(f"level {level}", [])
        for round_ in range(1, plan.rounds_per_level + 1):
            asks = plan_asks(tree, level, plan)
            if not asks:
                break
            before = len(tree.nodes_at(level))
            requests = [build_request(ask, plan, level, round_) for ask in asks]
            results = send(requests)
            replies = [_reply(ask, result, report) for ask, result in zip(asks, results)]
            added, rejections = merge_round(tree, asks, replies, round=round_, deduper=deduper)
            report.asks += len(asks)
            report.asks_by_kind.update(request.key.split(":", 1)[0] for request in requests)
            report.rejections.extend(rejections)
            added_per_round.append(added)
            logger.info("taxonomy level %d round %d: %d asks, %d added to %d", level, round_, len(asks), added, before)
            if added == 0 or (before and added / before < plan.min_round_gain):
                break
    return report


def plan_asks(tree: Tree, level: int, plan: GrowthPlan) -> list[Ask]:
    if level == 1:
        if plan.roots_owner is None:
            return []
        ask = Ask(tree.root, plan.roots_owner, plan.max_first_level, plan.reserved_roots)
        return [ask] if len(ask.existing()) < ask.cap else []
    parents = tree.nodes_at(level - 1)
    return [Ask(p, p.owner, plan.max_children) for p in parents if len(p.children) < plan.max_children]


def build_request(ask: Ask, plan: GrowthPlan, level: int, round_: int):
    from processors.llm.request import LLMRequest

    parent = ask.parent.parts
    existing = ask.existing()
    kind = prompts.kind_for(parent, existing)
    room = ask.cap - len(existing)
    per_ask = plan.new_first_level_per_round if not parent else plan.children_per_request
    return LLMRequest(
        key=f"{kind}:{task_id(parent) if parent else 'root'}:L{level}r{round_}",
        messages=prompts.build_messages(kind, parent, existing, min(per_ask, room)),
        prompt_version=prompts.TEMPLATES[kind].version,
        parse=functools.partial(parse_or_raise, parent=parent, limits=plan.limits),
        max_tokens=plan.max_tokens,
        temperature=plan.temperature,
    )


def _reply(ask: Ask, result, report: GrowthReport) -> ParsedReply | None:
    """The parsed reply, with its rejected lines recorded; None (and one rejection) when the request failed."""
    where = ask.parent.path or "(first level)"
    if not result.ok:
        report.rejections.append(
            Rejection(ask.owner, f"request for {where}", result.reason or "api_error", str(result.detail or ""))
        )
        return None
    parsed: ParsedReply = result.value
    for bad in parsed.rejected:
        detail = f"under {where}: {bad.detail}" if bad.detail else f"under {where}"
        report.rejections.append(Rejection(ask.owner, bad.line, bad.reason, detail))
    return parsed


def seed_tree(rows: Sequence[tuple[str, Sequence[str], Sequence[str]]]) -> Tree:
    """A tree from (owner key, paths, origins) rows: every path and its prefixes, owned by the row."""
    from loaders.taxonomy.names import split_path

    tree = Tree()
    for owner, paths, origins in rows:
        for path, origin in zip(paths, origins):
            tree.add_path(split_path(path), origin=origin, round=0, owner=owner)
    return tree
