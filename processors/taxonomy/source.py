"""The taxonomy stage's input rows: one per first-level seed category, plus the ``new-first-level`` row.

Each seed row carries its whole seeded subtree as ``~``-joined paths (with each path's origin), so a shard
can rebuild its part of the tree from its rows alone; the ``new-first-level`` row carries every seeded
first-level name (``known_roots``) so that new categories are never repeats, whichever shard it lands in.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from loaders.taxonomy.names import join_path, name_key, task_id

if TYPE_CHECKING:
    import datasets

    from loaders.taxonomy.seeds import SeedList

NEW_FIRST_LEVEL = "new-first-level"


def read_inputs(config) -> "list[SeedList]":
    """Seed file and imported task types (whichever the config names); bad lines raise unless skipped."""
    from loaders.taxonomy.seeds import read_seeds, read_tasktypes

    strict = config.seed_errors == "fail"
    lists = []
    if config.seeds is not None:
        lists.append(read_seeds(config.seeds, strict=strict))
    if config.import_tasktypes is not None:
        lists.append(read_tasktypes(config.import_tasktypes, strict=strict))
    return lists


def source_table(lists: "list[SeedList]", *, new_first_level: bool) -> "datasets.Dataset":
    import datasets

    groups: dict[str, dict] = {}
    for seed_list in lists:
        for seed in seed_list.paths:
            root = seed.parts[0]
            group = groups.setdefault(name_key(root), {"root": root, "paths": [], "origins": []})
            group["paths"].append(join_path(seed.parts))
            group["origins"].append(seed.origin)
    rows = {"root_id": [], "kind": [], "paths": [], "origins": [], "known_roots": []}
    for group in groups.values():
        _append(rows, task_id([group["root"]]), "seed_tree", group["paths"], group["origins"], [])
    if new_first_level:
        _append(rows, NEW_FIRST_LEVEL, "new_first_level", [], [], [g["root"] for g in groups.values()])
    strings = datasets.Sequence(datasets.Value("string"))
    features = datasets.Features({
        "root_id": datasets.Value("string"), "kind": datasets.Value("string"),
        "paths": strings, "origins": strings, "known_roots": strings,
    })
    return datasets.Dataset.from_dict(rows, features=features)


def _append(rows: dict, key: str, kind: str, paths: list, origins: list, known: list) -> None:
    rows["root_id"].append(key)
    rows["kind"].append(kind)
    rows["paths"].append(paths)
    rows["origins"].append(origins)
    rows["known_roots"].append(known)
