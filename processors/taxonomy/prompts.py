"""Prompt templates of the taxonomy step, in our own words, each with its own ``PROMPT_VERSION``.

Three asks (design.md §1 step 1): new first-level categories not yet in the list (``roots``); children of a
category that already has some (``supplement``); children of a category that has none (``expand``). The
parent is always given as its full ``~``-joined path so the model knows where it is in the tree, and the
reply format is one name per line without the parent prefix (the parser copes when the model ignores that).

The simulator's taxonomy responder recognises these prompts by ``SYSTEM_MARKER`` and reads the parent and
the existing names back from the ``PARENT_LABEL`` / ``EXISTING_LABEL`` lines: change those together.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from loaders.taxonomy.names import join_path

ROOTS, SUPPLEMENT, EXPAND = "roots", "supplement", "expand"

SYSTEM_MARKER = "taxonomy of visual task types"
SYSTEM = (
    "You are helping to build a large, hierarchical " + SYSTEM_MARKER + " for training vision-language "
    "models. A task type names one kind of question or instruction someone could pose about an image, "
    "such as reading the text on a street sign or counting the people in a crowd. Categories are written "
    "as paths whose levels are joined by '~', from the most general to the most specific. Names are short "
    "noun phrases (two to eight words), specific, distinct from one another, and answerable from an image."
)
PARENT_LABEL = "Parent category:"
EXISTING_LABEL = "Already listed:"
COUNT_LABEL = "How many to add:"

_ROOTS = (
    "Below are the top-level categories of the taxonomy so far.\n"
    f"{EXISTING_LABEL}\n{{existing}}\n\n"
    f"{COUNT_LABEL} {{count}}\n"
    "Propose new top-level categories of visual tasks that none of the listed ones covers. Do not repeat, "
    "rename or split a listed category.\n"
    "Answer with one category name per line and nothing else."
)
_SUPPLEMENT = (
    f"{PARENT_LABEL} {{parent}}\n"
    f"{EXISTING_LABEL}\n{{existing}}\n\n"
    f"{COUNT_LABEL} {{count}}\n"
    "Propose further subcategories of the parent category that are missing from the list. Each must be a "
    "narrower kind of the parent, not a synonym or a rewording of a listed one, and not belong to another "
    "category instead.\n"
    "Answer with one subcategory name per line, without the parent path, and nothing else."
)
_EXPAND = (
    f"{PARENT_LABEL} {{parent}}\n"
    f"{EXISTING_LABEL}\n(none yet)\n\n"
    f"{COUNT_LABEL} {{count}}\n"
    "Divide the parent category into narrower subcategories of visual tasks. Together they should cover "
    "the parent well; each should be clearly distinct from the others.\n"
    "Answer with one subcategory name per line, without the parent path, and nothing else."
)


@dataclass(frozen=True)
class Template:
    kind: str
    text: str
    version: str


TEMPLATES = {
    ROOTS: Template(ROOTS, _ROOTS, "taxonomy-roots-v1"),
    SUPPLEMENT: Template(SUPPLEMENT, _SUPPLEMENT, "taxonomy-supplement-v1"),
    EXPAND: Template(EXPAND, _EXPAND, "taxonomy-expand-v1"),
}
PROMPT_VERSIONS = {kind: template.version for kind, template in TEMPLATES.items()}


def build_messages(kind: str, parent: Sequence[str], existing: Sequence[str], count: int) -> list[dict]:
    """Chat messages for one ask. ``parent`` is () for ``roots``; ``existing`` are the listed names."""
    template = TEMPLATES[kind]
    listed = "\n".join(f"- {name}" for name in existing) or "(none yet)"
    user = template.text.format(parent=join_path(parent), existing=listed, count=count)
    return [{"role": "system", "content": SYSTEM}, {"role": "user", "content": user}]


def kind_for(parent: Sequence[str], existing: Sequence[str]) -> str:
    """roots for the invisible root, supplement when the parent has children, expand when it has none."""
    if not parent:
        return ROOTS
    return SUPPLEMENT if existing else EXPAND
