"""Step 1, ``taxonomy``: grow seed categories into a tree of vision task types; one output row per leaf.

Input rows (a source stage): one per first-level seed category, holding its seeded subtree, plus one row
``new-first-level`` that owns the new first-level categories the LLM proposes (and everything grown under
them). Growth is level by level over *all* rows of a shard at once (``batch_size=None``): each round sends
the asks of every parent together and merges them in a fixed order. With the default ``shard_size`` every
demo or paper seed file is one shard; if a file has more first-level categories than ``shard_size``, each
shard grows its own subtrees (the early-stop rule then applies per shard, and the ``new-first-level`` row
still sees every seed name through its ``known_roots`` column).

Resume: a shard is committed only when its whole growth is done; a crash mid-shard redoes it, but every
prompt is rebuilt identically (the tree grows deterministically from the same replies), so each request
already answered is a cache hit and is not paid again.

Output rows are the *leaves* (the task types proper, like the paper's ``tasktype.txt``); internal nodes are
the prefixes of their paths. Rejected reply lines and failed requests are item failures of the row that
owns the parent, counted by reason (``explanation``, ``wrong_parent``, ``duplicate``, ``near_duplicate``...).
``finalize`` writes ``tasktype.txt``, ``stats.json``, ``sunburst.html`` and ``sunburst.png``.
"""

from __future__ import annotations

import hashlib
import logging
from collections import Counter
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from pydantic import Field, field_serializer, model_validator

from builder.config import ExistingPath
from builder.ids import text_id
from builder.rows import BatchOutput
from builder.runfolder import atomic_write_json
from builder.stage import BatchFn, StageConfig, StageContext
from processors.stages.llm_stage import LLMStage
from processors.taxonomy.grow import GrowthPlan, GrowthReport, grow, seed_tree
from processors.taxonomy.source import NEW_FIRST_LEVEL

if TYPE_CHECKING:
    import datasets

    from loaders.taxonomy.seeds import SeedList
    from processors.taxonomy.dedup import SemanticDeduper

logger = logging.getLogger(__name__)

TAXONOMY_VERSION = "1"  # bump when growth or merging changes what the same replies produce
COLUMNS = ("task_id", "path", "level", "parent", "name", "origin", "round")
# Package data, so an installed wheel has it too (configs/seeds/vision_tasks.yaml links here in a checkout).
DEFAULT_SEEDS = Path(__file__).resolve().parents[1] / "taxonomy" / "data" / "vision_tasks.yaml"
SEEDS_REPORT = "seeds-report.json"
TAXONOMY_PROMPT_CHARS = 1_600  # estimate: instruction + the parent's existing children
TAXONOMY_REPLY_TOKENS_PER_CHILD = 14  # read back by processors.taxonomy.finish
GROWTH_DIR = "growth"
_DEDUPERS: dict[float, "SemanticDeduper"] = {}


class TaxonomyConfig(StageConfig):
    seeds: ExistingPath | None = Field(
        None, description="seed tree: YAML (.yaml/.yml) or ~-joined lines; default: the shipped vision seeds"
    )
    import_tasktypes: ExistingPath | None = Field(
        None, description="an existing tasktype.txt to import (origin 'imported'); with expand: false, as is"
    )
    seed_errors: Literal["fail", "skip"] = Field("fail", description="unusable seed lines stop the run, or are skipped")
    expand: bool = Field(True, description="grow the tree with the LLM; false = emit the seeds/imports as they are")
    new_first_level: bool = Field(True, description="also ask for new first-level categories (level 1)")
    levels: int = Field(3, ge=1, le=6, description="depth of the grown tree")
    rounds_per_level: int = Field(2, ge=1, le=20, description="asks per parent and level, at most")
    min_round_gain: float = Field(0.05, ge=0, le=1, description="stop a level when a round adds less than this share")
    new_first_level_per_round: int = Field(8, ge=1, le=100, description="new first-level categories asked per round")
    max_first_level: int = Field(80, ge=1, description="first-level categories at most")
    children_per_request: int = Field(8, ge=1, le=100, description="children asked per parent and round")
    max_children: int = Field(30, ge=1, description="children per parent at most; extra lines are over_limit")
    max_name_chars: int = Field(80, ge=8, description="longer names are rejected as too_long")
    max_name_words: int = Field(12, ge=2, description="names with more words are rejected as too_long")
    semantic_dedup: bool = Field(False, description="drop siblings whose MiniLM cosine reaches dedup_threshold")
    dedup_threshold: float = Field(0.9, gt=0, le=1, description="cosine similarity that makes a near-duplicate")
    endpoint: str = Field("gpt4o", description="name of an endpoint in llm.endpoints")
    temperature: float | None = Field(None, ge=0, le=2, description="sampling temperature; null = the endpoint's")
    max_tokens: int | None = Field(600, ge=16, description="reply length cap per ask")
    plots: bool = Field(True, description="write sunburst.html and sunburst.png in finalize")

    @model_validator(mode="before")
    @classmethod
    def _default_seeds(cls, data):
        if isinstance(data, dict) and data.get("seeds") is None and data.get("import_tasktypes") is None:
            data = {**data, "seeds": str(DEFAULT_SEEDS)}
        return data

    @field_serializer("seeds")
    def _shipped_seeds_as_default(self, seeds: Path | None) -> str | None:
        # The shipped seeds are written as null (= the default), never as this machine's install path: the
        # run folder's config.yaml and the dataset card show no absolute path of the checkout or the venv.
        return None if seeds is None or seeds == DEFAULT_SEEDS else str(seeds)


class TaxonomyStage(LLMStage):
    name = "taxonomy"
    description = "the task-type tree (one row per task type; leaves are the task types)"
    Config = TaxonomyConfig
    key = "task_id"
    upstream = None
    # batch_size None (LLMStage): growth is global over the shard's rows. A node whose request failed is
    # asked again on the next run (LLMStage.unanswered_reasons).
    prompt_chars = TAXONOMY_PROMPT_CHARS

    def shards_in_flight(self, config: TaxonomyConfig) -> int:
        return 1  # the seed files are one shard by default; a semantic deduper is shared across shards

    def input_key(self, config: TaxonomyConfig) -> str:
        return "root_id"

    def features(self, config: TaxonomyConfig) -> "datasets.Features":
        import datasets

        string, int32 = datasets.Value("string"), datasets.Value("int32")
        return datasets.Features(
            {"task_id": string, "path": string, "level": int32, "parent": string, "name": string,
             "origin": string, "round": int32}
        )

    def fingerprint_config(self, config: TaxonomyConfig) -> dict:
        # The seed files count by their content (fingerprint_parts), not by where they lie: a config copied to
        # another folder, or a checkout moved, re-runs nothing.
        return config.model_dump(mode="json", exclude={"seeds", "import_tasktypes"})

    def fingerprint_parts(self, config: TaxonomyConfig) -> dict:
        from processors.taxonomy.dedup import MODEL_ID
        from processors.taxonomy.parse import PARSER_VERSION
        from processors.taxonomy.prompts import PROMPT_VERSIONS

        return {
            "version": TAXONOMY_VERSION,
            "prompts": PROMPT_VERSIONS,
            "parser": PARSER_VERSION,
            "dedup_model": MODEL_ID if config.semantic_dedup else None,
            "seeds_sha256": _file_sha(config.seeds),
            "import_sha256": _file_sha(config.import_tasktypes),
        }

    def source_rows(self, config: TaxonomyConfig, ctx: StageContext) -> "datasets.Dataset":
        from processors.taxonomy.source import read_inputs, source_table

        lists = read_inputs(config)
        atomic_write_json(ctx.stage_dir / SEEDS_REPORT, _seeds_report(lists))
        return source_table(lists, new_first_level=config.expand and config.new_first_level)

    def estimated_requests(self, config: TaxonomyConfig, run_config, assumptions) -> int:
        return taxonomy_requests(config)

    def estimated_reply_tokens(self, config: TaxonomyConfig) -> int:
        return config.children_per_request * TAXONOMY_REPLY_TOKENS_PER_CHILD

    def make_batch_fn(self, config: TaxonomyConfig, ctx: StageContext) -> BatchFn:
        from processors.taxonomy.dedup import SemanticDeduper

        plan = GrowthPlan.from_config(config)
        deduper = None
        if config.semantic_dedup:  # one model per process and threshold, kept across shards
            deduper = _DEDUPERS.setdefault(config.dedup_threshold, SemanticDeduper(config.dedup_threshold))

        send = self.llm_call(config, ctx).send if config.expand else None

        def fn(batch: dict[str, list]) -> dict[str, list]:
            keys = batch["root_id"]
            tree = seed_tree(list(zip(keys, batch["paths"], batch["origins"])))
            owner = NEW_FIRST_LEVEL if NEW_FIRST_LEVEL in keys else None
            known = next((k for key, k in zip(keys, batch["known_roots"]) if key == NEW_FIRST_LEVEL), [])
            batch_plan = replace(plan, roots_owner=owner, reserved_roots=tuple(known))
            report = grow(tree, batch_plan, send, deduper) if config.expand else GrowthReport()
            ctx.add_usage(**{f"asks_{kind}": n for kind, n in report.asks_by_kind.items()})
            _write_growth(ctx, keys, report)
            return _emit(tree, report, keys)

        return fn

    def finalize(self, config: TaxonomyConfig, ctx: StageContext, output: "datasets.Dataset") -> None:
        from processors.taxonomy.finish import write_outputs

        write_outputs(ctx, output, plots=config.plots)


def _emit(tree, report, keys: list[str]) -> dict[str, list]:
    """Leaves as rows of their owner; rejections as item failures; an owner with no leaf as one row failure."""
    from loaders.taxonomy.names import task_id

    out = BatchOutput(COLUMNS)
    produced = set()
    for leaf in tree.leaves():
        out.add(leaf.owner, {
            "task_id": task_id(leaf.parts), "path": leaf.path, "level": leaf.level, "parent": leaf.parent_path,
            "name": leaf.name, "origin": leaf.origin, "round": leaf.round,
        })
        produced.add(leaf.owner)
    for rejection in report.rejections:
        out.fail(rejection.owner, rejection.reason, rejection.detail, item=rejection.line)
    for key in keys:
        if key not in produced:
            out.fail(key, "no_new_categories", "no usable first-level category came back")
    return out.to_columns()


def _write_growth(ctx: StageContext, keys: list[str], report) -> None:
    """Per-batch growth figures (asks, nodes added per round), merged into stats.json by finalize."""
    name = text_id(*sorted(keys))
    atomic_write_json(ctx.stage_dir / GROWTH_DIR / f"{name}.json", {
        "rows": len(keys), "asks": report.asks, "asks_by_kind": dict(report.asks_by_kind),
        "added_per_round": report.added,
        "rejected": dict(Counter(r.reason for r in report.rejections)),
    })


def _seeds_report(lists: "list[SeedList]") -> dict:
    return {
        lst.source: {"paths": len(lst.paths), "notes": lst.notes, "problems": [str(p) for p in lst.problems]}
        for lst in lists
    }


def _file_sha(path: Path | None) -> str | None:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest() if path else None



def taxonomy_requests(config: TaxonomyConfig) -> int:
    """Order of magnitude of the taxonomy's requests: rounds x parents per level (growth depends on replies)."""
    if not config.expand:
        return 0
    first = min(config.max_first_level, 30 + config.new_first_level_per_round * config.rounds_per_level)
    children = min(config.max_children, config.children_per_request * config.rounds_per_level)
    requests, parents = (config.rounds_per_level if config.new_first_level else 0), first
    for _ in range(2, config.levels + 1):
        requests += parents * config.rounds_per_level
        parents *= children
    return requests
