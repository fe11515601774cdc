"""``docs/extending.md`` as a newcomer follows it: its code blocks are written out as they stand, the lines it
names are added, and the result runs. A new LLM stage (``caption``) runs on the demo under ``--dry-run`` with
its simulator responder; a new referee kind (``short_answer``) is one module and one registry line."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
GUIDE = ROOT / "docs" / "extending.md"


def code_blocks() -> dict[str, str]:
    """The guide's Python blocks, by the path their first line names (``# processors/...``) or their order."""
    blocks = re.findall(r"```python\n(.*?)```", GUIDE.read_text(encoding="utf-8"), flags=re.S)
    named = {}
    for index, block in enumerate(blocks):
        first = block.splitlines()[0]
        named[first[2:].strip() if first.startswith("# processors/") else f"block-{index}"] = block
    return named


def write_module(folder: Path, path_in_guide: str, name: str) -> None:
    """The block the guide gives for ``path_in_guide``, as module ``name`` (the product tree stays as it is)."""
    (folder / f"{name}.py").write_text(code_blocks()[path_in_guide], encoding="utf-8")


def test_the_guide_names_at_most_three_files_for_a_stage_and_one_file_plus_a_line_for_a_referee():
    text = GUIDE.read_text(encoding="utf-8")
    files = set(re.findall(r"^# (processors/\S+\.py)$", text, flags=re.M))
    assert files == {"processors/stages/caption.py", "processors/referees/short_answer.py"}
    lines_in_pipeline = [line for line in code_blocks()["block-1"].splitlines() if line.startswith("    from ")]
    assert len(lines_in_pipeline) == 2 and all("processors.stages.caption" in line for line in lines_in_pipeline)


def test_a_caption_stage_built_as_the_guide_says_runs_on_the_demo_under_dry_run(tmp_path, monkeypatch):
    from builder.outputs import load_stage_output
    from processors.estimate import Assumptions, estimate
    from processors.pipeline import config_sections, default_responders, default_stages
    from processors.session import dry_run_services, open_run

    write_module(tmp_path, "processors/stages/caption.py", "caption_stage")
    monkeypatch.syspath_prepend(str(tmp_path))
    import caption_stage

    # The guide's two lines in processors/pipeline.py, as the composer would return them.
    stages = [*default_stages(), caption_stage.CaptionStage()]
    responders = [*default_responders(), caption_stage.SIM_RESPONDER]
    config = yaml.safe_load((ROOT / "configs" / "demo.yaml").read_text())
    config["stages"]["caption"] = {}
    path = tmp_path / "caption.yaml"
    path.write_text(yaml.safe_dump(config))

    with dry_run_services(True, responders=responders) as services:
        runner = open_run(path, run_dir=tmp_path / "run", dry_run=True, services=services, progress=False,
                          stages=stages, sections=config_sections())
        runner.run({"images", "caption"})
    images = load_stage_output(runner.run_dir, "images")
    captions = load_stage_output(runner.run_dir, "caption").to_list()
    assert len(captions) == len(images) > 0
    assert all(row["caption"].startswith("A ") and row["caption"].endswith(".") for row in captions)
    # Adding a stage changes no other stage's fingerprint.
    plain = open_run(ROOT / "configs" / "demo.yaml", run_dir=tmp_path / "plain", dry_run=True, progress=False)
    assert {name: runner.fingerprint_of(name) for name in plain._fingerprints} == plain._fingerprints
    # ... and it shows in the estimate from the figures it declares.
    rows = dict(estimate(runner.config, Assumptions(images=1000), stages))
    assert rows["caption"].requests == 1000


def test_a_referee_kind_is_one_module_and_one_registry_line(tmp_path, monkeypatch):
    from processors.referees import factory
    from processors.referees.protocol import RefereeItem
    from processors.referees.settings import RefereeSettings
    from processors.stages.score import ScoreConfig, ScoreStage, score_all

    write_module(tmp_path, "processors/referees/short_answer.py", "short_answer_referee")
    monkeypatch.syspath_prepend(str(tmp_path))
    line = next(block for block in code_blocks().values() if block.lstrip().startswith('"short_answer"'))
    entry = eval("{" + line.strip().rstrip(",") + "}", {"RefereeKind": factory.RefereeKind})  # noqa: S307
    kind = entry["short_answer"]
    monkeypatch.setitem(factory.KINDS, "short_answer",
                        factory.RefereeKind(kind.target.replace("processors.referees.short_answer",
                                                                "short_answer_referee"), on_device=kind.on_device))

    config_line = re.search(r"`- (\{name: short, backend: short_answer[^`]*\})`", GUIDE.read_text()).group(1)
    settings = RefereeSettings.model_validate(yaml.safe_load(config_line))
    referee = factory.build_referee(settings)
    items = [RefereeItem("q1", "/img.png", "OCR", "What does it say?", "Stop"),
             RefereeItem("q2", "/img.png", "OCR", "Describe it.", " ".join(["word"] * 12))]
    ballots = score_all([settings], [referee], {"short": items}, client=None)
    assert {q: (v.vote, v.error) for q, v in ballots["short"].items()} == {"q1": (1, None), "q2": (0, None)}
    stage_config = ScoreConfig(referees=[settings])
    assert ScoreStage().shards_in_flight(stage_config) == 1 and ScoreStage().llm_endpoints(stage_config) == []
    with pytest.raises(ValueError, match="no referee kind"):
        RefereeSettings.model_validate({"name": "x", "backend": "shortanswer", "model_id": "none"})
