"""Reading whole columns fast (datasets 5.x hands out lazy Column objects that format row by row)."""

from __future__ import annotations

import datasets

from builder.outputs import column_values, image_paths_by_id


def test_column_values_equal_row_iteration_and_follow_selections():
    ds = datasets.Dataset.from_dict({"image_id": [f"i{n}" for n in range(6)], "path": [f"r/{n}.jpg" for n in range(6)]})
    assert column_values(ds, "path") == list(ds["path"])
    picked = ds.select([4, 1, 5])  # an indices mapping: the values must come in the selection's order
    assert column_values(picked, "image_id") == ["i4", "i1", "i5"]
    kept = ds.filter(lambda row: row["image_id"] != "i2")
    assert column_values(kept, "image_id") == ["i0", "i1", "i3", "i4", "i5"]
    assert image_paths_by_id(picked) == {"i4": "r/4.jpg", "i1": "r/1.jpg", "i5": "r/5.jpg"}


def test_builder_imports_nothing_above_it():
    # The framework knows no stage, model or loader: the composition root is processors/session.py.
    import ast
    from pathlib import Path

    offending = []
    for path in sorted((Path(__file__).resolve().parents[2] / "builder").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [node.module or ""] if isinstance(node, ast.ImportFrom) else (
                [a.name for a in node.names] if isinstance(node, ast.Import) else [])
            offending += [f"{path.name}: {n}" for n in names if n.split(".")[0] in ("processors", "loaders")]
    assert offending == []
