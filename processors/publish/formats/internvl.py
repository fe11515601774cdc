"""InternVL fine-tuning (``internvl_chat``): ``taskgalaxy_internvl.jsonl``, JSONL of ``{"id", "image", "width",
"height", "conversations"}`` with ``<image>\\n`` opening the first human turn, and ``meta.json`` naming it.
InternVL opens ``os.path.join(root, image)``; ``root`` and ``annotation`` are written as absolute paths
(InternVL resolves relative ones from its own working directory): edit the two if the folder moves."""

from __future__ import annotations

from processors.publish.formats.base import Format, OutFile, image_path, json_bytes, jsonl_bytes, user_text


def render(samples, context):
    rows = [{"id": s.id, "image": image_path(s), "width": s.width, "height": s.height,
             "conversations": [{"from": "human", "value": user_text(s)}, {"from": "gpt", "value": s.answer}]}
            for s in samples]
    yield OutFile(context.main_name, jsonl_bytes(rows), "the InternVL JSONL")
    meta = {context.name: {"root": f"{context.out_dir}/", "annotation": str(context.out_dir / context.main_name),
                           # no max_dynamic_patch: a meta file's would override the launch script's own
                           # (--max_dynamic_patch: 6 in InternVL2.5's fine-tuning scripts, 12 in InternVL3's)
                           "data_augment": False, "repeat_time": 1,
                           "length": len(rows)}}
    yield OutFile("meta.json", json_bytes(meta), "InternVL's meta JSON")


FORMAT = Format("internvl", "InternVL internvl_chat fine-tuning (--meta_path DIR/meta.json)",
                "taskgalaxy_internvl.jsonl", render)
