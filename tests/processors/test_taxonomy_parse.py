"""The reply parser over a corpus of messy replies: one case per rule, plus the simulator's own output."""

from __future__ import annotations

import random

import pytest

from processors.taxonomy import prompts, simulate
from processors.taxonomy.parse import NameLimits, parse_or_raise, parse_reply

PARENT = ("Optical character recognition", "Scene text")


def _parse(text, parent=PARENT, **limits):
    parsed = parse_reply(text, parent, NameLimits(**limits) if limits else NameLimits())
    return list(parsed.names), [(r.line, r.reason) for r in parsed.rejected]


@pytest.mark.parametrize(
    "reply",
    [
        "1. Street sign reading\n2) Menu reading\n(3) Poster reading\na) Banner reading",
        "- Street sign reading\n* Menu reading\n• Poster reading\n+ Banner reading",
        '"Street sign reading"\n\'Menu reading\'\n“Poster reading”\n**Banner reading**',
        "```\nStreet sign reading\nMenu reading\n```\n~~~\nPoster reading\n~~~\n---\nBanner reading",
        "Street sign reading\n\n\n   Menu reading   \nPoster reading\nBanner reading\n",
        "`Street sign reading`\n__Menu reading__\n1. **\"Poster reading\"**\n- Banner reading.",
    ],
    ids=["numbering", "bullets", "quotes-and-bold", "fences-and-rules", "blank-lines", "mixed-markup"],
)
def test_markup_is_stripped(reply):
    names, rejected = _parse(reply)
    assert names == ["Street sign reading", "Menu reading", "Poster reading", "Banner reading"]
    assert rejected == []


def test_explanations_are_rejected_and_counted():
    reply = (
        "Here are four new subcategories for scene text:\n"
        "### Subcategories\n"
        "- Street sign reading\n"
        "Sure, these cover the most common cases.\n"
        "- Menu reading\n"
        "Each of these tasks asks the model to read text in the wild.\n"
        "I hope this helps!\n"
    )
    names, rejected = _parse(reply)
    assert names == ["Street sign reading", "Menu reading"]
    assert [reason for _, reason in rejected] == ["explanation"] * 5


@pytest.mark.parametrize(
    "line",
    [
        "Optical character recognition~Scene text~Poster reading",
        "Optical character recognition ∼ Scene text ∼ Poster reading",
        "Optical character recognition〜Scene text〜Poster reading",
        "Optical character recognition～Scene text～Poster reading",
        "Scene text -> Poster reading",
        "Scene text → Poster reading",
        "Scene text / Poster reading",
        "Scene text/Poster reading",
        "Scene text > Poster reading",
        "Scene text: Poster reading",
        "OCR~Scene text~Poster reading",  # an abbreviated ancestor: the parent decides
        "scene TEXT ~ poster   reading",
        "Poster reading",
    ],
)
def test_separators_and_parent_prefixes(line):
    assert _parse(f"- {line}") == (["Poster reading"], [])


def test_slash_inside_a_name_is_not_a_separator():
    names, rejected = _parse("- Yes/no questions about signs\n- Before/after comparison")
    assert names == ["Yes/no questions about signs", "Before/after comparison"] and rejected == []


def test_trailing_descriptions_are_cut():
    reply = "- Poster reading - reading large printed posters\n- Menu reading: prices and dishes\n" \
            "- Plate reading (e.g. license plates)\n- Ticket reading — train and bus tickets"
    assert _parse(reply) == (["Poster reading", "Menu reading", "Plate reading", "Ticket reading"], [])


def test_case_and_whitespace_variants_are_duplicates():
    names, rejected = _parse("- Poster reading\n- poster  READING\n- Poster-reading\n- POSTER READING.")
    assert names == ["Poster reading"]
    assert [reason for _, reason in rejected] == ["duplicate"] * 3


def test_structural_rejections():
    reply = (
        "- Document text~Receipt reading\n"  # another category's child
        "- Optical character recognition~Scene text~Signs~Exit signs\n"  # two levels down
        "- Scene text\n"  # the parent itself
        "- Optical character recognition\n"  # an ancestor
        "- Scene text~~Posters\n"  # an empty level
        "- 12345\n"  # no letters
        "- A remarkably long and winding name for a task that nobody could ever use in practice at all\n"
    )
    names, rejected = _parse(reply)
    assert names == []
    assert [reason for _, reason in rejected] == [
        "wrong_parent", "too_deep", "repeats_parent", "repeats_parent", "malformed", "malformed", "too_long",
    ]


def test_limits_are_configurable():
    assert _parse("- Poster reading in a train station", max_words=4)[1][0][1] == "too_long"
    assert _parse("- Poster reading", max_chars=10)[1][0][1] == "too_long"


def test_first_level_replies():
    names, rejected = _parse("1. Video reasoning\n2. OCR~Scene text\n3. Map reading", parent=())
    assert names == ["Video reasoning", "Map reading"]
    assert rejected == [("2. OCR~Scene text", "too_deep")]


def test_prose_only_reply_raises_for_a_retry():
    with pytest.raises(ValueError):
        parse_or_raise("I am sorry, I cannot help with that request today.", PARENT, NameLimits())
    with pytest.raises(ValueError):
        parse_or_raise("", PARENT, NameLimits())
    assert parse_or_raise("- Scene text", PARENT, NameLimits()).rejected[0].reason == "repeats_parent"


def test_every_simulator_line_is_parsed_or_counted():
    """Over many simulated replies nothing is dropped silently and every mess kind shows up."""
    reasons = set()
    for index in range(200):
        parent = () if index % 10 == 0 else (("Object counting",) if index % 2 else ("Object counting", f"Crowd {index}"))
        existing = [f"Existing {i}" for i in range(index % 3)]
        messages = prompts.build_messages(prompts.kind_for(parent, existing), parent, existing, 6)
        assert simulate.matches(messages)
        reply = simulate.respond(messages, random.Random(0))
        assert reply == simulate.respond(messages, random.Random(1))  # deterministic per prompt
        parsed = parse_reply(reply, parent)
        content = [line for line in reply.splitlines() if line.strip() and not line.startswith("```")]
        assert len(parsed.names) + len(parsed.rejected) == len(content)
        assert len(parsed.names) >= 4
        reasons.update(r.reason for r in parsed.rejected)
    assert {"explanation", "duplicate", "wrong_parent", "too_deep", "too_long"} <= reasons


@pytest.mark.parametrize("line, why", [
    ("- Object localization~\ufffdJ\ufffd$0", "U+FFFD"),  # seen from a real vLLM server (random weights)
    ("- Scene\u200btext reading", "U+200B"),  # zero-width space
    ("- Sign \u202ereading", "U+202E"),  # right-to-left override
    ("- X9 #4 !!", "too few letters"),
    ("- 2D/3D", "too few letters"),
])
def test_debris_and_invisible_characters_are_refused(line, why):
    parent = ("Object localization",) if "Object" in line else ()
    parsed = parse_reply(line, parent)
    assert parsed.names == ()
    assert parsed.rejected[0].reason == "malformed" and why in parsed.rejected[0].detail


def test_short_real_names_still_pass():
    assert parse_reply("- OCR\n- 3D reconstruction\n- Counting (0-9)", ()).names == (
        "OCR", "3D reconstruction", "Counting (0-9)")


def test_a_broken_json_reply_is_asked_again_not_read_line_by_line():
    with pytest.raises(ValueError, match="does not decode"):
        parse_or_raise('{"oops": - Scene text\n- Poster r ,,', ("Optical character recognition",), NameLimits())
