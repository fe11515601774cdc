"""The simulator's answers to the QA prompt: deterministic, English, and sometimes messy in realistic ways.

``SIM_RESPONDER`` is listed in ``processors.pipeline.default_responders``, which hands it to the simulator. The
responder reads the task types and the count back from the prompt (``processors.qa.prompt``) and writes one
question and answer per slot. ``rng`` is seeded from the request (image included), so the same request
always gets the same reply. With fixed probabilities a reply takes one of the shapes the parser must read
(``SHAPES``) and single items carry one of the defects validation must catch (``DEFECTS``); about one reply
in 25 holds no JSON at all, and the repair turn is always answered with clean JSON.
"""

from __future__ import annotations

import json
import random
import re

from processors.simulator.responders import Responder, message_text
from processors.qa.prompt import COUNT_PHRASE, MARKER, REPAIR_MARKER

# (shape, weight): how the item list is written out.
SHAPES = (("wrapped", 45), ("bare_array", 14), ("fenced", 14), ("json_lines", 12), ("other_key", 11),
          ("no_json", 4))
# (defect, probability per item): valid-after-normalisation variants first, then invalid ones.
DEFECTS = (("odd_label", 0.08), ("prefix_debris", 0.05), ("invented_label", 0.05), ("empty_answer", 0.04),
           ("duplicate", 0.03))
REGIONS = ("upper left corner", "centre", "lower right area", "background", "foreground", "left edge")
THINGS = ("object", "text", "shape", "colour pattern", "group of items", "sign")
ASKS = (
    "Focusing on the {region}, what does the {thing} there tell you when the task is {leaf}? Explain step by step.",
    "Using {leaf} as the skill, compare the {thing} in the {region} with the rest of the image: what differs?",
    "What would someone doing {leaf} conclude from the {thing} in the {region}, and what evidence supports it?",
    "For {leaf}: how many distinct parts make up the {thing} in the {region}, and how are they arranged?",
)
ANSWERS = (
    "The {thing} in the {region} is the key evidence. Looking closely, it shows {n} distinct parts, so the "
    "answer is {n}.",
    "Judging by the {thing} in the {region}, the image shows a clear pattern: {n} elements stand out, which "
    "answers the question.",
)
_COUNT = re.compile(re.escape(COUNT_PHRASE) + r"\s*(\d+)")


def matches(messages: list[dict]) -> bool:
    return MARKER in message_text(messages)


def prompt_types(text: str) -> tuple[list[str], int]:
    """(task types, questions per type) as the QA prompt lists them."""
    listing = text.split(MARKER, 1)[1].split("\n\n", 1)[0]
    types = [line[2:].strip() for line in listing.splitlines() if line.startswith("- ")]
    count = _COUNT.search(text)
    return types, int(count.group(1)) if count else 1


def make_items(types: list[str], per_type: int, rng: random.Random) -> list[dict]:
    items = []
    for task_type in types:
        leaf = task_type.split("~")[-1].lower()
        for k in range(per_type):
            words = {"region": rng.choice(REGIONS), "thing": rng.choice(THINGS), "leaf": leaf, "n": rng.randint(2, 9)}
            question = rng.choice(ASKS).format(**words)
            if k:
                question = f"{question} (Part {k + 1})"
            items.append({"task_type": task_type, "question": question, "answer": rng.choice(ANSWERS).format(**words)})
    return items


def spoil(items: list[dict], rng: random.Random) -> list[dict]:
    """Give some items one defect each (see ``DEFECTS``)."""
    out = []
    for item in items:
        item = dict(item)
        roll = rng.random()
        for defect, rate in DEFECTS:
            if roll < rate:
                _apply(defect, item, out)
                break
            roll -= rate
        out.append(item)
    return out


def _apply(defect: str, item: dict, earlier: list[dict]) -> None:
    if defect == "odd_label":
        item["task_type"] = "  " + item["task_type"].replace("~", " \u223c ").upper() + " "
    elif defect == "prefix_debris":
        item["question"] = "Question: " + item["question"]
    elif defect == "invented_label":
        item["task_type"] = "Imagined skills~" + item["task_type"].split("~")[-1] + " (variant)"
    elif defect == "empty_answer":
        item["answer"] = "  "
    elif defect == "duplicate" and earlier:
        item["question"] = earlier[-1]["question"]


def render(items: list[dict], shape: str) -> str:
    """The reply text for ``items`` written in ``shape``."""
    if shape == "wrapped":
        return json.dumps({"qa": items}, ensure_ascii=False)
    if shape == "bare_array":
        return json.dumps(items, ensure_ascii=False, indent=1)
    if shape == "fenced":
        return "Here are the questions:\n```json\n" + json.dumps(items, ensure_ascii=False, indent=2) + "\n```\n"
    if shape == "json_lines":
        return "\n".join(json.dumps(item, ensure_ascii=False) for item in items)
    if shape == "other_key":
        return json.dumps({"result": {"questions": items}}, ensure_ascii=False)
    return "\n".join(f"{i}. {item['task_type']} - Q: {item['question']} A: {item['answer']}"
                     for i, item in enumerate(items, 1))


def respond(messages: list[dict], rng: random.Random) -> str:
    types, per_type = prompt_types(message_text(messages))
    items = make_items(types, per_type, rng)
    last = messages[-1].get("content")
    if isinstance(last, str) and REPAIR_MARKER in last:
        return render(items, "wrapped")
    shape = rng.choices([s for s, _ in SHAPES], weights=[w for _, w in SHAPES])[0]
    return render(spoil(items, rng), shape)


SIM_RESPONDER = Responder("qa", matches=matches, respond=respond)
