"""LLaVA / LLaVA-NeXT: a JSON list of ``{"id", "image", "task_type", "conversations"}``, ``image`` relative to
the image folder (``--image_folder``). What ``taskgalaxy export --llava`` always wrote, byte for byte, except
that a literal ``<image>`` (or ``<video>``, ``<audio>``) in a question or answer is now written ``< image>``
(``records.neutral``), so no trainer counts it as a second image."""

from __future__ import annotations

from processors.publish.formats.base import Format, OutFile, json_bytes


def render(samples, context):
    yield OutFile(context.main_name, json_bytes([s.llava() for s in samples]), "the LLaVA JSON")


FORMAT = Format("llava", "LLaVA / LLaVA-NeXT (train.py --data_path OUT.json --image_folder DIR/images)",
                "taskgalaxy_llava.json", render)
