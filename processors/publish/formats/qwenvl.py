"""Qwen2.5-VL / Qwen3-VL (``qwen-vl-finetune``): a JSON list of ``{"image": path, "conversations": [{"from":
"human"|"gpt", "value"}]}``, one ``<image>`` per image in the human turn, never in an answer. The dataset is
registered in ``qwenvl/data/__init__.py`` as ``{"annotation_path": DIR/taskgalaxy_qwenvl.json,
"data_path": DIR}``; the image path is joined to ``data_path``."""

from __future__ import annotations

from processors.publish.formats.base import Format, OutFile, image_path, json_bytes, user_text


def render(samples, context):
    rows = [{"image": image_path(s),
             "conversations": [{"from": "human", "value": user_text(s)}, {"from": "gpt", "value": s.answer}]}
            for s in samples]
    yield OutFile(context.main_name, json_bytes(rows), "the Qwen-VL JSON")


FORMAT = Format("qwenvl", "Qwen2.5-VL / Qwen3-VL qwen-vl-finetune (data_path: DIR)", "taskgalaxy_qwenvl.json",
                render)
