"""LLaMA-Factory: sharegpt JSON ``taskgalaxy_llamafactory.json`` (``conversations`` of ``from``/``value``,
``human``/``gpt``; ``images``: paths relative to the dataset folder, which is LLaMA-Factory's ``media_dir`` by
default) and the
``dataset_info.json`` that registers it. One ``<image>`` in the human turn per image: LLaMA-Factory checks
that the count of ``<image>`` tokens equals the number of images."""

from __future__ import annotations

from processors.publish.formats.base import Format, OutFile, image_path, json_bytes, user_text


def render(samples, context):
    rows = [{"conversations": [{"from": "human", "value": user_text(s)}, {"from": "gpt", "value": s.answer}],
             "images": [image_path(s)]} for s in samples]
    yield OutFile(context.main_name, json_bytes(rows), "the LLaMA-Factory JSON")
    info = {context.name: {
        "file_name": context.main_name,
        "formatting": "sharegpt",
        "columns": {"messages": "conversations", "images": "images"},
        "tags": {"role_tag": "from", "content_tag": "value", "user_tag": "human", "assistant_tag": "gpt"},
    }}
    yield OutFile("dataset_info.json", json_bytes(info), "LLaMA-Factory's dataset_info.json")


FORMAT = Format("llamafactory", "LLaMA-Factory (dataset_dir: DIR, dataset: taskgalaxy)", "taskgalaxy_llamafactory.json",
                render)
