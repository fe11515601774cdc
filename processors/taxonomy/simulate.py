"""The simulator's answers to the taxonomy prompts: plausible, deterministic children with realistic mess.

``SIM_RESPONDER`` is listed in ``processors.pipeline.default_responders``, which hands it to the simulator.
Names are built from the parent's name with a qualifier ("Fine-grained ...") and/or a context ("... in aerial
imagery"), avoiding the names the prompt lists. Around them, with fixed probabilities, the reply carries the
mess real models produce, one kind per parser rule: a preamble and a closing remark, code fences, numbering
and bullets, bold and quotes, the parent path repeated with ``~``/``∼``/``〜``/``->``/``/``, trailing
descriptions, a case variant of an earlier line, a reworded near-duplicate, a line for another parent, one
two levels deep and an overlong one. The random generator is seeded from the prompt text, so the same prompt
always gets the same reply whatever the simulator's own seed.
"""

from __future__ import annotations

import hashlib
import random
import re

from processors.simulator.responders import Responder, message_text
from processors.taxonomy import prompts

NEW_FIRST_LEVEL = [
    "3D scene understanding", "Video frame reasoning", "Sign language recognition", "Astronomy image analysis",
    "Agricultural image analysis", "Sports analytics", "Retail shelf analysis", "Robot manipulation planning",
    "Accessibility descriptions", "Geolocation from images", "Image forensics", "Cultural artifact recognition",
    "Infographic understanding", "Advertisement understanding", "Comic and manga understanding",
    "Music score reading", "Interior design analysis", "Architecture analysis", "Weather map interpretation",
    "Disaster damage assessment", "Biological specimen identification", "Chemical structure recognition",
    "Circuit diagram reading", "Video game screen understanding", "Optical illusion understanding",
    "Visual puzzle solving", "Sensitive content detection", "Photography technique analysis",
    "Symbol and icon meaning", "Embodied navigation questions", "Product packaging reading",
    "Assembly instruction following", "Educational worksheet solving", "Handwritten mathematics",
]
QUALIFIERS = [
    "Fine-grained", "Multi-object", "Zero-shot", "Comparative", "Coarse", "Multi-step", "Open-vocabulary",
    "Cross-image", "Quantitative", "Rare-category", "Small-object", "Occluded", "Multilingual",
    "Low-resolution", "Region-level", "Compositional", "Temporal", "Uncertain-case", "Counterfactual",
    "Step-by-step",
]
CONTEXTS = [
    "in natural photos", "in documents", "in aerial imagery", "in low-light scenes", "in cluttered scenes",
    "in medical images", "in screenshots", "in infographics", "in artworks", "in sketches",
    "in underwater scenes", "at night", "in crowded streets", "in indoor rooms", "in product photos",
    "in historical photographs", "in video frames", "in synthetic renderings", "in satellite images",
    "under occlusion", "with distractors", "across viewpoints", "with reflections", "in handwritten notes",
]
# Rewordings MiniLM scores as near-duplicates of the context they replace.
SYNONYMS = {
    "in aerial imagery": "in aerial photographs", "at night": "at nighttime", "in documents": "in document images",
    "in screenshots": "in screen captures", "in artworks": "in works of art", "in sketches": "in drawings",
    "in product photos": "in product photographs", "in satellite images": "in satellite imagery",
}
OTHER_PARENTS = ["Document understanding", "Object counting", "Facial analysis", "Map understanding"]
SEPARATORS = ["~", " ∼ ", "〜", " -> ", " / "]
MARKERS = ["", "{i}. ", "- ", "* ", "• ", "{i}) "]

_AFFIX = re.compile(
    "^(?:" + "|".join(map(re.escape, QUALIFIERS)) + r")\s+|\s+(?:"
    + "|".join(map(re.escape, [*CONTEXTS, *SYNONYMS.values()])) + ")$",
    re.IGNORECASE,
)


def matches(messages: list[dict]) -> bool:
    return prompts.SYSTEM_MARKER in message_text(messages[:1])


def respond(messages: list[dict], rng: random.Random) -> str:
    """Reply to one taxonomy prompt. ``rng`` is ignored on purpose: see the module docstring."""
    text = message_text(messages)
    parent, existing, count = read_prompt(text)
    rng = random.Random(hashlib.sha256(text.encode("utf-8")).digest())
    names = _new_roots(existing, count, rng) if not parent else _children(parent, existing, count, rng)
    return _messy(names, parent, rng)


def read_prompt(text: str) -> tuple[list[str], list[str], int]:
    """(parent path, listed names, how many asked) back out of our own prompt."""
    parent: list[str] = []
    existing: list[str] = []
    count = 5
    listing = False
    for line in text.splitlines():
        if line.startswith(prompts.PARENT_LABEL):
            parent = [p for p in line[len(prompts.PARENT_LABEL) :].strip().split("~") if p]
        elif line.startswith(prompts.EXISTING_LABEL):
            listing = True
        elif line.startswith(prompts.COUNT_LABEL):
            count = int(line[len(prompts.COUNT_LABEL) :].strip() or 5)
        elif listing and line.startswith("- "):
            existing.append(line[2:].strip())
        elif listing and not line.strip():
            listing = False
    return parent, existing, count


def _new_roots(existing: list[str], count: int, rng: random.Random) -> list[str]:
    taken = {e.casefold() for e in existing}
    pool = [name for name in NEW_FIRST_LEVEL if name.casefold() not in taken]
    rng.shuffle(pool)
    return pool[:count]


def _core(name: str) -> str:
    core = _AFFIX.sub("", _AFFIX.sub("", name)).strip()
    return core[:1].lower() + core[1:] if core[1:2].islower() else core


def _children(parent: list[str], existing: list[str], count: int, rng: random.Random) -> list[str]:
    core = _core(parent[-1])
    deep = len(parent) >= 2
    taken = {e.casefold() for e in existing}
    names: list[str] = []
    for _ in range(count * 6):
        if len(names) >= count:
            break
        qualifier, context = rng.choice(QUALIFIERS), rng.choice(CONTEXTS)
        if set(qualifier.lower().split("-")) & set(core.lower().split()):
            continue  # no "Multi-object object counting"
        shape = rng.random()
        if deep or shape < 0.35:
            name = f"{qualifier} {core} {context}" if deep else f"{qualifier} {core}"
        else:
            name = f"{core} {context}"
        name = name[:1].upper() + name[1:]
        if name.casefold() not in taken:
            taken.add(name.casefold())
            names.append(name)
    return names


def _messy(names: list[str], parent: list[str], rng: random.Random) -> str:
    lines = [_decorate(name, parent, i, rng) for i, name in enumerate(names, start=1)]
    extras = _extras(names, parent, rng)
    for line in extras:
        lines.insert(rng.randint(0, len(lines)), line)
    marker = rng.choice(MARKERS)
    body = [marker.format(i=i) + line if not line.startswith(("```", "Here", "Sure")) else line
            for i, line in enumerate(lines, start=1)]
    if rng.random() < 0.2:
        body = ["```", *body, "```"]
    if rng.random() < 0.3:
        what = "top-level categories" if not parent else f"subcategories of {parent[-1]}"
        body.insert(0, f"Here are {len(names)} more {what}:")
    if rng.random() < 0.15:
        body.append("Let me know if you would like more detail on any of these.")
    return "\n".join(body)


def _decorate(name: str, parent: list[str], index: int, rng: random.Random) -> str:
    roll = rng.random()
    if parent and roll < 0.08:
        separator = rng.choice(SEPARATORS)
        return separator.join([*parent[-rng.randint(1, len(parent)) :], name])
    if roll < 0.12:
        return f'"{name}"'
    if roll < 0.15:
        return f"**{name}**"
    if roll < 0.19:
        return f"{name} - covers questions about {name.lower()}"
    return name


def _extras(names: list[str], parent: list[str], rng: random.Random) -> list[str]:
    extras: list[str] = []
    if names and rng.random() < 0.12:
        extras.append(rng.choice(names).lower())  # a case variant: duplicate
    rewordable = [n for n in names if any(n.endswith(c) for c in SYNONYMS)]
    if rewordable and rng.random() < 0.3:
        name = rng.choice(rewordable)
        context = next(c for c in SYNONYMS if name.endswith(c))
        extras.append(name[: -len(context)] + SYNONYMS[context])  # near-duplicate
    if parent and rng.random() < 0.06:
        other = rng.choice([p for p in OTHER_PARENTS if p != parent[-1]])
        extras.append(f"{other}~{rng.choice(QUALIFIERS)} {_core(other)}")  # wrong parent
    if parent and names and rng.random() < 0.04:
        extras.append(f"{parent[-1]}~{names[0]}~{rng.choice(QUALIFIERS)} variant")  # too deep
    if rng.random() < 0.04:
        extras.append(" ".join(["Very detailed and exhaustive analysis of"] + rng.sample(CONTEXTS, 4)))
    return extras


SIM_RESPONDER = Responder("taxonomy", matches=matches, respond=respond)
