"""Seed files and imported task-type lists: both formats, every normalisation, every rejection with its line."""

from __future__ import annotations

import codecs

import pytest

from loaders.taxonomy.names import clean_name, name_key, split_path, task_id
from loaders.taxonomy.seeds import SeedError, read_seeds, read_tasktypes
from loaders.taxonomy.tasktypes import write_tasktypes
from processors.stages.taxonomy import DEFAULT_SEEDS


def _paths(seeds):
    return ["~".join(p.parts) for p in seeds.paths]


def test_yaml_tree_keeps_line_numbers_and_nests(tmp_path):
    path = tmp_path / "seeds.yaml"
    path.write_text(
        "OCR:\n"
        "  Scene text:\n"
        "    - Street sign reading\n"
        "    - Menu~Price reading\n"
        "  handwriting:\n"
        "Counting: Crowd counting\n"
        "Charts:\n"
        "  - Bar charts\n"
        "  - Pie charts: {Slice share: null}\n"
        "OCR:\n"
        "  Scene text:\n",
        encoding="utf-8",
    )
    seeds = read_seeds(path)
    assert _paths(seeds) == [
        "OCR", "OCR~Scene text", "OCR~Scene text~Street sign reading", "OCR~Scene text~Menu~Price reading",
        "OCR~Handwriting", "Counting", "Counting~Crowd counting", "Charts", "Charts~Bar charts",
        "Charts~Pie charts", "Charts~Pie charts~Slice share",
    ]
    assert [p.line for p in seeds.paths][:3] == [1, 2, 3]
    assert all(p.origin == "seed" for p in seeds.paths)
    assert any("duplicate of line 1" in note for note in seeds.notes)  # the repeated OCR key


def test_lines_are_normalised(tmp_path):
    path = tmp_path / "seeds.txt"
    text = (
        "# a comment\r\n"
        "OCR ∼ Scene text\r\n"
        "\r\n"
        "OCR〜Scene text〜Street sign reading\r\n"
        "ocr~ scene  TEXT \r\n"  # case/whitespace variant of line 2
        "  counting～crowd counting  \r\n"
        "OCR~Scene text\r\n"
    )
    path.write_bytes(codecs.BOM_UTF8 + text.encode("utf-8"))
    seeds = read_seeds(path)
    assert _paths(seeds) == ["OCR~Scene text", "OCR~Scene text~Street sign reading", "Counting~Crowd counting"]
    assert [p.line for p in seeds.paths] == [2, 4, 6]
    assert "UTF-8 byte-order mark removed" in seeds.notes
    assert sum("duplicate of line 2" in n for n in seeds.notes) == 2
    assert sum("tilde look-alike" in n for n in seeds.notes) == 3


def test_utf16_file_is_read(tmp_path):
    path = tmp_path / "seeds.txt"
    path.write_bytes("OCR~Scene text\nCounting\n".encode("utf-16"))
    assert _paths(read_seeds(path)) == ["OCR~Scene text", "Counting"]


def test_bad_lines_are_rejected_with_their_line_numbers(tmp_path):
    path = tmp_path / "seeds.txt"
    path.write_bytes(
        b"OCR~Scene text\n"
        b"Caf\xe9 menus\n"  # latin-1, not UTF-8
        b"OCR~~Signs\n"
        b"Charts~\n"
        b"A\x07bell\n"
        b"a~b~c~d~e~f~g\n"
        b"Counting\n"
    )
    with pytest.raises(SeedError) as error:
        read_seeds(path)
    message = str(error.value)
    for expected in ("line 2: not utf8", "line 3: empty name", "line 4: empty name", "line 5: control character",
                     "line 6: too deep"):
        assert expected in message
    lenient = read_seeds(path, strict=False)
    assert _paths(lenient) == ["OCR~Scene text", "Counting"]
    assert [p.line for p in lenient.problems] == [2, 3, 4, 5, 6]


def test_yaml_syntax_error_names_the_line(tmp_path):
    path = tmp_path / "seeds.yml"
    path.write_text("OCR:\n  - a\n - b: [\n", encoding="utf-8")
    with pytest.raises(SeedError, match="yaml error"):
        read_seeds(path)


def test_import_tasktype_file_round_trips(tmp_path):
    leaves = [("OCR", "Scene text", "Street sign reading"), ("OCR", "Handwriting"), ("Counting",)]
    path = tmp_path / "tasktype.txt"
    assert write_tasktypes(path, leaves) == 3
    assert path.read_bytes() == b"OCR~Scene text~Street sign reading\nOCR~Handwriting\nCounting\n"
    imported = read_tasktypes(path)
    assert [p.parts for p in imported.paths] == leaves
    assert {p.origin for p in imported.paths} == {"imported"}


def test_names_and_ids():
    assert clean_name("  scene   text. ") == "Scene text"
    assert clean_name("iPhone screenshots") == "iPhone screenshots"
    assert name_key("Scene-Text") == name_key("scene text") == name_key("SCENE_TEXT.")
    assert split_path("OCR ∼ scene text〜signs") == ["OCR", "Scene text", "Signs"]
    assert task_id(["OCR", " Scene  text"]) == task_id(["OCR", "Scene text"])
    assert task_id(["OCR", "Scene text"]) != task_id(["OCR", "Scene texts"])


def test_shipped_seed_file():
    seeds = read_seeds(DEFAULT_SEEDS)
    first = {p.parts[0] for p in seeds.paths}
    depths = {len(p.parts) for p in seeds.paths}
    assert 30 <= len(first) <= 60 and depths == {1, 2, 3}
    assert not seeds.problems


def test_seeds_with_invisible_characters_or_debris_are_refused_by_line(tmp_path):
    path = tmp_path / "seeds.txt"
    path.write_text("OCR~Scene\u200btext\nCharts~\u202eBar charts\nCounting~\ufffd\ufffd\nCounting\n", encoding="utf-8")
    lenient = read_seeds(path, strict=False)
    assert _paths(lenient) == ["Counting"]
    assert [(p.line, p.reason) for p in lenient.problems] == [(1, "bad_name"), (2, "bad_name"), (3, "bad_name")]


def test_a_yaml_alias_bomb_is_refused_at_once(tmp_path):
    lines = ["a: &a [OCR, OCR, OCR, OCR, OCR, OCR, OCR, OCR, OCR]"]
    lines += [f"{chr(98 + i)}: &{chr(98 + i)} [*{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, "
              f"*{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}]" for i in range(8)]
    path = tmp_path / "seeds.yaml"
    path.write_text("\n".join(lines) + "\n")  # ~400 bytes that would expand to 9^9 names
    lenient = read_seeds(path, strict=False)
    assert _paths(lenient) == []
    assert [(p.line, p.reason) for p in lenient.problems] == [(2, "yaml_alias")]
    with pytest.raises(SeedError, match="alias"):
        read_seeds(path)


@pytest.mark.parametrize("data, words", [
    (b"", "no task type in the file"),
    (b"  \n\t\n# only a comment\n", "no task type in the file"),
    (codecs.BOM_UTF16_LE + "OCR\n".encode("utf-16-le") + b"\x00", "not utf16"),
])
def test_files_without_usable_seeds_are_errors_not_empty_taxonomies(tmp_path, data, words):
    path = tmp_path / "seeds.txt"
    path.write_bytes(data)
    with pytest.raises(SeedError, match=words):
        read_seeds(path)


def test_cr_only_line_endings_and_a_huge_bad_line(tmp_path):
    path = tmp_path / "seeds.txt"
    path.write_bytes(b"OCR\rCounting\rCharts~Bar charts\r")
    assert _paths(read_seeds(path)) == ["OCR", "Counting", "Charts~Bar charts"]
    path.write_bytes(b"OCR\n" + b"A\x07" + b"x" * 100_000 + b"\n")
    with pytest.raises(SeedError) as error:
        read_seeds(path)
    assert len(str(error.value)) < 1000 and "(100002 characters)" in str(error.value)
