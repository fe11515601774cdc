"""Task type names are text: markup an LLM invents (HTML tags, templates, code spans) is refused with a reason by
the seed loader and by the reply parser, like other debris; every real task name the project ships still passes."""

from __future__ import annotations

import pytest

from loaders.taxonomy.names import name_problem
from loaders.taxonomy.seeds import read_seeds
from processors.stages.taxonomy import DEFAULT_SEEDS
from processors.taxonomy import simulate
from processors.taxonomy.parse import parse_reply

HOSTILE = [
    ("</script><script>alert('cat')</script> reading", "'<'"),
    ("<img src=x onerror=alert(1)> captioning", "'<'"),
    ("Chart <b>bold</b> value reading", "'<'"),
    ("Arrow direction reading>", "'>'"),
    ("{{ template }} questions", "'{{'"),
    ("Leaked {{config.secret}} reading", "'{{'"),
    ("Trailing template }} reading", "'}}'"),
    ("{% for x in y %} counting", "'{%'"),
    ("Inline `code` reading", "'`'"),
    ("Red \x1b[31mtext\x1b[0m reading", "U+001B"),
    ("Null\x00byte reading", "U+0000"),
    ("C1 control\x85 reading", "U+0085"),
]

# Names of the kind the paper's taxonomy holds, punctuation included: none of them is markup.
REAL_NAMES = [
    "Optical character recognition", "Yes/no questions", "Q&A over infographics", "Text-to-image retrieval",
    "C++ code screenshot reading", "Age estimation (0-100 years)", "Left-right comparison", "T-shirt print reading",
    "Percentage (%) value reading", "Price tag reading ($, €, £)", "Emoji meaning 😀", "Chess position analysis",
    "3D scene understanding", "GUI element grounding", "Math word problems: geometry", "Dr. Seuss book covers",
    "Rock-paper-scissors recognition", "Traffic sign recognition #2", "Star rating (1-5) reading",
    "Spatial relation reasoning", "Mixed-script text (中文 and English) reading", "Café menu reading",
]


@pytest.mark.parametrize("name, why", HOSTILE)
def test_markup_and_control_characters_are_no_names(name, why):
    problem = name_problem(name)
    assert problem is not None and why in problem, problem


@pytest.mark.parametrize("name", REAL_NAMES)
def test_real_names_are_accepted(name):
    assert name_problem(name) is None


def test_every_name_the_project_ships_is_accepted():
    seeds = read_seeds(DEFAULT_SEEDS)  # configs/seeds/vision_tasks.yaml links to this file
    names = {part for path in seeds.paths for part in path.parts}
    assert not seeds.problems and len(names) > 100
    generated = [*simulate.NEW_FIRST_LEVEL, *simulate.OTHER_PARENTS]
    generated += [f"{q} {n.lower()} {c}" for q in simulate.QUALIFIERS for n in sorted(names)[:20]
                  for c in [*simulate.CONTEXTS, *simulate.SYNONYMS.values()]]
    refused = {name: name_problem(name) for name in sorted(names) + generated if name_problem(name)}
    assert not refused


def test_a_seed_file_with_markup_names_is_refused_line_by_line(tmp_path):
    path = tmp_path / "seeds.txt"
    lines = ["OCR~Scene text", "OCR~<script>alert(1)</script> reading", "Charts~{{ template }} reading",
             "Charts~Bar charts"]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    seeds = read_seeds(path, strict=False)
    assert ["~".join(p.parts) for p in seeds.paths] == ["OCR~Scene text", "Charts~Bar charts"]
    assert [(p.line, p.reason) for p in seeds.problems] == [(2, "bad_name"), (3, "bad_name")]
    assert "markup character '<'" in seeds.problems[0].text and "template syntax '{{'" in seeds.problems[1].text


def test_a_reply_with_markup_names_counts_each_as_malformed_with_the_reason():
    reply = "\n".join(["1. Poster text reading", *(f"{i + 2}. {name}" for i, (name, _) in enumerate(HOSTILE[:9]))])
    parsed = parse_reply(reply, ("Optical character recognition",))
    # backticks are emphasis the parser strips before it judges a name: "Inline code reading" is text
    assert parsed.names == ("Poster text reading", "Inline code reading")
    assert len(parsed.rejected) == 8 and {r.reason for r in parsed.rejected} == {"malformed"}
    assert all(r.detail.startswith(("markup character", "template syntax")) for r in parsed.rejected), parsed
