"""ms-swift: ``taskgalaxy_swift.jsonl``, JSONL of ``{"messages": [{"role", "content"}...], "images": [path]}``,
one ``<image>`` in the user content per image, in order. ms-swift opens a relative image path from its working
directory: run it from the output folder."""

from __future__ import annotations

from processors.publish.formats.base import Format, OutFile, image_path, jsonl_bytes, user_text


def render(samples, context):
    rows = ({"messages": [{"role": "user", "content": user_text(s)}, {"role": "assistant", "content": s.answer}],
             "images": [image_path(s)]} for s in samples)
    yield OutFile(context.main_name, jsonl_bytes(rows), "the ms-swift JSONL")


FORMAT = Format("swift", "ms-swift (cd DIR && swift sft --dataset taskgalaxy_swift.jsonl)", "taskgalaxy_swift.jsonl",
                render)
