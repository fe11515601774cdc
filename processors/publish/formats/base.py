"""What an export format is: a name, the trainer that reads it, where its images go, and a ``render`` that turns
the samples (``processors.publish.records.Sample``) into the files that trainer reads.

``render`` only produces the files' contents (bytes, or a function that writes them to a binary handle: a big
file goes straight to its staged path, never whole in memory); ``processors.publish.export`` checks, writes
(all or nothing, each file as ``render`` yields it) and places the images, the same way for every format.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from typing import BinaryIO
from dataclasses import dataclass
from pathlib import Path

from processors.publish.records import IMAGE_TOKEN, Sample

IMAGES = "images"  # the image folder under the output folder, for the formats that link their images


@dataclass(frozen=True)
class Context:
    out_dir: Path  # the real output folder
    name: str  # the dataset's name in a trainer's registry (``dataset_info.json``, InternVL's meta)
    main_name: str  # the main file's name (``--llava OUT.json`` names LLaVA's)


@dataclass(frozen=True)
class OutFile:
    path: str  # relative to the output folder
    data: bytes | Callable[[BinaryIO], None]  # the bytes, or what writes them to the staged file's handle
    what: str  # names the file in an error message


@dataclass(frozen=True)
class Format:
    name: str
    trainer: str  # who reads it, for --help and the log
    main_name: str  # the default name of the main file
    render: Callable[[list[Sample], Context], Iterable[OutFile]]
    images: bool = True  # False: the images travel inside the files (no image folder)
    owns: tuple[str, ...] = ()  # globs (relative to the output folder) of files an earlier export of this
    # format wrote that this one replaces: what it does not write again is removed


def image_path(sample: Sample) -> str:
    """The sample's image relative to the output folder, for the trainers told to use that folder as root."""
    return f"{IMAGES}/{sample.image}"


def user_text(sample: Sample) -> str:
    """The user turn for the trainers that mark the image with a token: ``<image>``, then the question (which
    holds no placeholder of its own, see ``records.neutral``)."""
    return f"{IMAGE_TOKEN}\n{sample.question}"


def json_bytes(value) -> bytes:
    return json.dumps(value, ensure_ascii=False, indent=1).encode("utf-8")


def jsonl_bytes(rows: Iterable[dict]) -> bytes:
    return "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows).encode("utf-8")
