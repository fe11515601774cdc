"""One canonical record per kept sample, read once from a finished run, that every export format writes from.

A ``Sample`` holds what any trainer's file needs: the ids, the images-stage path of the image and the file it
resolves to, the task path, the question and the answer, the referees' votes and p(yes), the image's source and
size. It is built from the ``final`` stage (joined to ``images`` by path for source and size, and to ``score``
by ``qa_id`` for the votes, where those stages exist).

Model text is made safe for trainers here, once: control characters are stripped (``printable``), and a
literal media placeholder or chat-template token in a question or an answer gets a space after its ``<``
(``neutral``): ``<image>``, ``<video>``, ``<audio>`` (every trainer below counts or expands them, so a question
that merely talks about ``<image>`` would otherwise ask for a second image), InternVL's ``<img>``, ``</img>``
and ``<IMG_CONTEXT>``, and ChatML/Qwen's ``<|...|>`` tokens (``<|image_pad|>`` is expanded per image;
``<|im_end|>`` in an answer would end the turn where the trainer masks the labels). ``Sample.neutralized``
counts the replacements.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from pathlib import Path

from builder import runfolder as rf
from builder.outputs import load_stage_output, require_intact_stage
from processors.qa.validate import strip_control

logger = logging.getLogger(__name__)

IMAGE_TOKEN = "<image>"
LLAVA_PREFIX = IMAGE_TOKEN + "\n"  # how the final stage opens every human turn
# Tokens a trainer's template or processor reads in the text: media placeholders (LLaVA, LLaMA-Factory,
# ms-swift, InternVL, Qwen's fine-tuning), InternVL's image tags and context token, ChatML/Qwen special tokens.
_PLACEHOLDER = re.compile(r"<(image|video|audio|/?img|IMG_CONTEXT|\|[A-Za-z0-9_]{1,40}\|)>")


def printable(value):
    """``value`` (a string, or lists/dicts of them) without ANSI escape sequences and control characters;
    newline and tab are kept.

    The QA stage strips these already; exports strip them again because they also read final stages of older
    runs and of other pipelines, and a NUL or an ANSI escape in a published file breaks the tools that read it."""
    if isinstance(value, str):
        return strip_control(value)
    if isinstance(value, list):
        return [printable(v) for v in value]
    if isinstance(value, dict):
        return {k: printable(v) for k, v in value.items()}
    return value


def neutral(text: str) -> tuple[str, int]:
    """``text`` with every literal placeholder or special token (``_PLACEHOLDER``) written ``< image>``,
    ``< |im_end|>`` (a space after ``<``), which no trainer or tokenizer reads as one; and how many were
    replaced."""
    return _PLACEHOLDER.subn(r"< \1>", text)


def neutral_turns(conversations: list[dict]) -> tuple[list[dict], int]:
    """LLaVA turns with placeholders neutralised (``neutral``) everywhere but the one ``<image>\\n`` that opens
    the first human turn, the sample's own image token — written there when that turn does not open with it
    (a final stage of another pipeline: "Q1 <image>"), so the record asks for its image exactly once."""
    turns, count = [], 0
    for index, turn in enumerate(conversations):
        value = turn["value"]
        opens = index == 0 and turn.get("from") == "human"
        keep = LLAVA_PREFIX if opens and value.startswith(LLAVA_PREFIX) else ""
        rest, n = neutral(value[len(keep):])
        turns.append({**turn, "value": (LLAVA_PREFIX if opens else "") + rest})
        count += n
    return turns, count


@dataclass
class Sample:
    id: str
    image: str  # the images-stage path, ``<root name>/<path in root>``
    task_type: str
    question: str  # neutral: no placeholder token of its own
    answer: str
    conversations: list[dict]  # the LLaVA turns as the final stage holds them (printable, neutral)
    qa_id: str = ""
    image_id: str = ""
    votes: dict = field(default_factory=dict)  # referee -> 0/1
    p_yes: dict = field(default_factory=dict)  # referee -> float
    votes_total: int | None = None
    source: str = ""
    width: int = 0
    height: int = 0
    file: Path | None = None  # the file ``image`` resolves to (set by ``read_samples`` given a resolver)
    neutralized: int = 0  # placeholders written ``< image>`` in this sample's text

    def llava(self) -> dict:
        """The LLaVA record: exactly the final stage's four LLaVA fields."""
        return {"id": self.id, "image": self.image, "task_type": self.task_type,
                "conversations": self.conversations}


def sample_from_row(row: dict, image: dict | None = None, score: dict | None = None) -> Sample:
    """A ``final`` row (plus its ``images`` row and its ``score`` row, when known) as a ``Sample``."""
    conversations, count = neutral_turns(printable(row["conversations"]))
    human = next((t["value"] for t in conversations if t["from"] == "human"), "")
    answer = next((t["value"] for t in conversations if t["from"] == "gpt"), "")
    question = human[len(LLAVA_PREFIX):] if human.startswith(LLAVA_PREFIX) else human
    image, score = image or {}, score or {}
    return Sample(
        id=row["id"], image=row["image"], task_type=printable(row["task_type"]), question=question, answer=answer,
        conversations=conversations, qa_id=row.get("qa_id") or "", image_id=row.get("image_id") or "",
        votes=dict(score.get("votes") or {}), p_yes=dict(score.get("p_yes") or {}),
        votes_total=row.get("votes_total"), source=image.get("source") or "",
        width=int(image.get("width") or 0), height=int(image.get("height") or 0), neutralized=count)


def read_samples(run_dir: Path, resolve_image=None) -> list[Sample]:
    """Every kept sample of ``run_dir``, sorted by id (a file is identical across reruns); ``ValueError`` on
    duplicate ids. With ``resolve_image`` (``loaders.images.paths.trusted_image_resolver``) each sample's
    ``file`` is set, and a width or height the images stage did not record is read from the file's header."""
    require_intact_stage(run_dir, "final")
    final = load_stage_output(run_dir, "final")
    images = _rows_by(run_dir, "images", "path", ("path", "source", "width", "height"))
    scores = (_rows_by(run_dir, "score", "qa_id", ("qa_id", "votes", "p_yes"))
              if "qa_id" in final.column_names else {})
    samples = [sample_from_row(row, images.get(row["image"]), scores.get(row.get("qa_id")))
               for row in final]
    samples.sort(key=lambda s: s.id)
    ids = [s.id for s in samples]
    if len(set(ids)) != len(ids):
        raise ValueError(f"the final stage of {run_dir} holds duplicate ids; rerun the final stage")
    if resolve_image is not None:
        from processors.publish.imagefolder import checked_sources

        files = checked_sources([s.image for s in samples], resolve_image)
        for sample in samples:
            sample.file = files[sample.image]
            if not (sample.width and sample.height):
                sample.width, sample.height = _size(sample.file)
    return samples


def _rows_by(run_dir: Path, stage: str, key: str, columns: tuple[str, ...]) -> dict:
    """``key`` -> row (only ``columns``) of a finished stage; {} when the run has no such stage (a run of
    another pipeline, a test's toy run)."""
    if rf.find_stage_dir(run_dir, stage) is None:
        return {}
    require_intact_stage(run_dir, stage)
    data = load_stage_output(run_dir, stage, require_done=False)
    kept = [c for c in columns if c in data.column_names]
    if key not in kept:
        return {}
    return {row[key]: row for row in data.select_columns(kept)}


def _size(file: Path) -> tuple[int, int]:
    from PIL import Image

    with Image.open(file) as image:  # reads the header only
        return image.size
