"""Have LLaMA-Factory's and ms-swift's OWN dataset-loading code read our exports (issue 23, item 3).

Run by scripts/trainer_check.sh, inside each trainer's own venv (never the project's .venv):

    .trainer-venvs/llamafactory/bin/python scripts/trainer_check.py llamafactory EXPORT_DIR WORK_DIR
    .trainer-venvs/swift/bin/python        scripts/trainer_check.py swift        EXPORT_DIR WORK_DIR

Nothing is downloaded (HF_HUB_OFFLINE=1): where a trainer's code wants a processor, a tiny Llava-1.5 processor
(CLIP image processor at 32 px / patch 8, a byte-level BPE built in memory with ``<image>`` as a special
token) is written to WORK_DIR/tiny-llava-processor first; no model weights exist or are needed.

llamafactory: the path of ``llamafactory-cli train`` up to the dataset: ``get_train_args`` (stage sft,
  template llava, dataset ``taskgalaxy`` from the export's dataset_info.json), ``load_tokenizer``,
  ``get_template_and_fix_tokenizer``, ``get_dataset`` (``load_dataset`` over the JSON, the sharegpt
  converter resolving images under media_dir, then the supervised processor, whose Llava mm_plugin runs
  ``_validate_messages`` -- the ``<image>``-count rule -- and opens every image through the processor), then
  ``get_mm_inputs`` (the collator's image path) over every sample. A negative control feeds the plugin one
  sample with a second ``<image>`` to show that the rule fires.
swift: ``swift.dataset.load_dataset([jsonl], strict=True)`` (MessagesPreprocessor via AutoPreprocessor), then
  ``EncodePreprocessor`` with the ``llava1_5_hf`` template over the loaded rows (image loading, ``<image>``
  replacement, tokenising); ms-swift does not raise on a tag/image mismatch (it prepends missing tags or
  warns), so its own ``Template._add_default_tags`` is run on each row and must add no tag.

The last line printed is ``key=value`` pairs for the shell script.
"""

from __future__ import annotations

import json
import os
import sys
import time
import traceback
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

IMAGE = "<image>"


def build_tiny_processor(out: Path) -> Path:
    """A Llava-1.5-shaped processor folder (no weights): config.json, tokenizer, CLIP image processor."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import CLIPImageProcessor, LlavaConfig, LlavaProcessor, PreTrainedTokenizerFast

    if (out / "processor_config.json").exists() or (out / "preprocessor_config.json").exists():
        return out
    out.mkdir(parents=True, exist_ok=True)
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())  # sorted: ids must not change between processes
    specials = ["<unk>", "<s>", "</s>", "<pad>", IMAGE]
    vocab = {tok: i for i, tok in enumerate(specials + alphabet)}
    bpe = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                                  pad_token="<pad>", extra_special_tokens={"image_token": IMAGE})
    tok.add_special_tokens({"additional_special_tokens": [IMAGE]})
    tok.chat_template = ("{% for m in messages %}{% if m['role'] == 'user' %}USER: {{ m['content'] }} "
                         "{% else %}ASSISTANT: {{ m['content'] }}</s>{% endif %}{% endfor %}"
                         "{% if add_generation_prompt %}ASSISTANT:{% endif %}")
    image_processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    processor = LlavaProcessor(image_processor=image_processor, tokenizer=tok, patch_size=8,
                               vision_feature_select_strategy="default", num_additional_image_tokens=1,
                               chat_template=tok.chat_template)
    processor.save_pretrained(str(out))
    tok.save_pretrained(str(out))
    config = LlavaConfig(image_token_index=tok.convert_tokens_to_ids(IMAGE),
                         text_config={"model_type": "llama", "vocab_size": len(tok), "hidden_size": 64,
                                      "intermediate_size": 128, "num_hidden_layers": 1,
                                      "num_attention_heads": 2, "num_key_value_heads": 2},
                         vision_config={"model_type": "clip_vision_model", "image_size": 32, "patch_size": 8,
                                        "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
                                        "num_attention_heads": 2})
    config.save_pretrained(str(out))
    return out


def _expected(export: Path, main_name: str) -> list[dict]:
    """The export's rows, read with plain json, as the reference for what the trainer read."""
    path = export / main_name
    if path.suffix == ".jsonl":
        return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    return json.loads(path.read_text(encoding="utf-8"))


def check_llamafactory(export: Path, work: Path) -> dict:
    import llamafactory
    from llamafactory.data import get_dataset, get_template_and_fix_tokenizer
    from llamafactory.data.converter import align_dataset
    from llamafactory.data.parser import get_dataset_list
    from llamafactory.hparams import get_train_args
    from llamafactory.model import load_tokenizer

    result: dict = {"llamafactory_version": llamafactory.__version__}
    expected = _expected(export, "taskgalaxy_llamafactory.json")
    n = len(expected)
    proc_dir = build_tiny_processor(work / "tiny-llava-processor")
    args = {
        "model_name_or_path": str(proc_dir), "template": "llava", "stage": "sft", "do_train": True,
        "finetuning_type": "lora", "dataset": "taskgalaxy", "dataset_dir": str(export),
        "output_dir": str(work / "lf-out"), "cutoff_len": 4096, "overwrite_cache": True,
        "preprocessing_num_workers": None, "report_to": "none", "per_device_train_batch_size": 1,
    }
    model_args, data_args, training_args, _finetuning_args, _gen_args = get_train_args(args)
    print(f"[llamafactory] media_dir={data_args.media_dir} template={data_args.template}")

    # 1. the registry entry, as LLaMA-Factory parses dataset_info.json
    (attr,) = get_dataset_list(["taskgalaxy"], data_args.dataset_dir)
    print(f"[llamafactory] dataset_info.json -> {attr!r}: formatting={attr.formatting} load_from={attr.load_from}"
          f" messages={attr.messages} images={attr.images} role_tag={attr.role_tag} user_tag={attr.user_tag}")

    tokenizer_module = load_tokenizer(model_args)
    tokenizer = tokenizer_module["tokenizer"]
    processor = tokenizer_module["processor"]
    print(f"[llamafactory] processor={type(processor).__name__} tokenizer={type(tokenizer).__name__}")
    template = get_template_and_fix_tokenizer(tokenizer, data_args)
    print(f"[llamafactory] template mm_plugin={type(template.mm_plugin).__name__}"
          f" image_token={template.mm_plugin.image_token}")

    # 2. the aligned (converted) dataset: load_dataset over the JSON + SharegptDatasetConverter
    from llamafactory.data.loader import _load_single_dataset
    aligned = _load_single_dataset(attr, model_args, data_args, training_args)
    resolved = 0
    missing = []
    rule_ok = 0
    for row, exp in zip(aligned, expected):
        images = row["_images"] or []
        for img in images:
            if isinstance(img, str) and os.path.isabs(img) and os.path.isfile(img):
                resolved += 1
            else:
                missing.append(img)
        tags = sum(m["content"].count(IMAGE) for m in row["_prompt"] + row["_response"])
        if tags == len(images) == len(exp["images"]):
            rule_ok += 1
    roles_ok = all([m["role"] for m in r["_prompt"] + r["_response"]] == ["user", "assistant"] for r in aligned)
    text_ok = all(r["_prompt"][0]["content"] == e["conversations"][0]["value"]
                  and r["_response"][0]["content"] == e["conversations"][1]["value"] for r, e in zip(aligned, expected))
    print(f"[llamafactory] aligned rows={len(aligned)}/{n} roles user/assistant={roles_ok} text as exported={text_ok}"
          f" images resolved under media_dir={resolved}/{n} missing={missing[:3]}")
    result.update(aligned=len(aligned), images_resolved=resolved, roles_ok=roles_ok, text_ok=text_ok)

    # 3. the whole get_dataset path (what run_sft calls): tokenising + mm_plugin.process_messages per sample
    t0 = time.time()
    module = get_dataset(template, model_args, data_args, training_args, stage="sft", **tokenizer_module)
    train = module["train_dataset"]
    print(f"[llamafactory] get_dataset: train_dataset rows={len(train)}/{n} columns={train.column_names}"
          f" ({time.time() - t0:.1f}s)")
    image_id = tokenizer.convert_tokens_to_ids(IMAGE)
    expanded = [row["input_ids"].count(image_id) for row in train]
    per_image = 16  # (32 // 8) ** 2 + 1 additional - 1 (vision_feature_select_strategy default)
    print(f"[llamafactory] <image> expanded to {sorted(set(expanded))} image tokens per sample (expected {per_image})")
    result.update(read=len(train), expanded_ok=all(e == per_image for e in expanded))

    # 4. every image through the plugin's own loader + the processor (the collator's get_mm_inputs path)
    t0 = time.time()
    opened = 0
    shapes = set()
    for row in aligned:
        images = row["_images"] or []
        mm = template.mm_plugin.get_mm_inputs(images, [], [], [len(images)], [0], [0], [], processor)
        opened += int(mm["pixel_values"].shape[0])
        shapes.add(tuple(mm["pixel_values"].shape[1:]))
    print(f"[llamafactory] mm_plugin.get_mm_inputs opened {opened}/{n} images, pixel_values {sorted(shapes)}"
          f" ({time.time() - t0:.1f}s)")
    result["images_opened"] = opened

    # 5. the <image>-count rule: each aligned sample passes _validate_messages; a doctored one must not
    plugin = template.mm_plugin
    for row in aligned:
        plugin._validate_messages(row["_prompt"] + row["_response"], row["_images"] or [], [], [])
    bad = [dict(m) for m in aligned[0]["_prompt"] + aligned[0]["_response"]]
    bad[0]["content"] = IMAGE + bad[0]["content"]
    try:
        plugin.process_messages(bad, aligned[0]["_images"], [], [], processor)
        fired = False
        print("[llamafactory] negative control: a sample with 2 <image> and 1 image was ACCEPTED")
    except ValueError as e:
        fired = True
        print(f"[llamafactory] negative control: 2 <image> + 1 image -> ValueError: {str(e)[:90]}...")
    result.update(rule_checked=len(aligned), rule_ok=rule_ok, rule_fires=fired)
    return result


def check_swift(export: Path, work: Path) -> dict:
    os.chdir(export)  # ms-swift opens a relative image path from the working directory (our README says: cd DIR)
    import swift
    from swift.dataset import EncodePreprocessor, load_dataset
    from swift.model import get_processor
    from swift.template import get_template
    from swift.template.template_inputs import StdTemplateInputs
    from swift.template.base import Template
    from swift.template.vision_utils import load_image

    result: dict = {"swift_version": getattr(swift, "__version__", "?")}
    expected = _expected(export, "taskgalaxy_swift.jsonl")
    n = len(expected)

    # 1. swift's own loader: a local .jsonl path, AutoPreprocessor -> MessagesPreprocessor, strict=True
    t0 = time.time()
    train, val = load_dataset([str(export / "taskgalaxy_swift.jsonl")], strict=True, num_proc=1,
                              load_from_cache_file=False)
    print(f"[swift] load_dataset: rows={len(train)}/{n} columns={train.column_names} val={val}"
          f" ({time.time() - t0:.1f}s)")
    rows = list(train)
    text_ok = all(r["messages"][0]["content"] == e["messages"][0]["content"]
                  and r["messages"][1]["content"] == e["messages"][1]["content"] for r, e in zip(rows, expected))
    roles_ok = all([m["role"] for m in r["messages"]] == ["user", "assistant"] for r in rows)
    paths = [[img["path"] if isinstance(img, dict) else img for img in r["images"]] for r in rows]
    paths_ok = paths == [e["images"] for e in expected]
    print(f"[swift] roles user/assistant={roles_ok} text as exported={text_ok} image paths as exported={paths_ok}"
          f" images column={rows[0]['images']}")

    # 2. images: swift's own load_image on each path (relative to the working directory, the export folder)
    resolved = 0
    for p in paths:
        for path in p:
            img = load_image(path)
            img.load()
            resolved += 1
    print(f"[swift] vision_utils.load_image opened {resolved}/{n} images (cwd={os.getcwd()})")

    # 3. the <image> rule: swift's own _add_default_tags must add no tag (count of <image> == count of images)
    rule_ok = 0
    for r in rows:
        inputs = StdTemplateInputs.from_dict({"messages": [dict(m) for m in r["messages"]], "images": list(r["images"])})
        before = [m["content"] for m in inputs.messages]
        Template._add_default_tags(inputs)
        tags = sum(m["content"].count(IMAGE) for m in inputs.messages if isinstance(m["content"], str))
        if [m["content"] for m in inputs.messages] == before and tags == len(inputs.images):
            rule_ok += 1
    print(f"[swift] _add_default_tags added no tag and <image> count == image count: {rule_ok}/{n}")
    doctored = StdTemplateInputs.from_dict({"messages": [{"role": "user", "content": "no tag"},
                                                         {"role": "assistant", "content": "a"}],
                                            "images": [paths[0][0]]})
    Template._add_default_tags(doctored)
    fires = doctored.messages[0]["content"].startswith(IMAGE)
    print(f"[swift] negative control: a row with 1 image and no <image> gets one prepended by swift: {fires}")

    # 4. EncodePreprocessor with the llava1_5_hf template (tiny processor, no weights): the training encode
    proc_dir = build_tiny_processor(work / "tiny-llava-processor")
    encoded = 0
    try:
        processor = get_processor(str(proc_dir), model_type="llava1_5_hf", download_model=False)
        template = get_template(processor, max_length=4096, template_type="llava1_5_hf")
        template.set_mode("train")
        t0 = time.time()
        enc = EncodePreprocessor(template=template)(train, num_proc=1, load_from_cache_file=False, strict=True)
        encoded = len(enc)
        image_id = processor.tokenizer.convert_tokens_to_ids(IMAGE)
        counts = sorted({list(e["input_ids"]).count(image_id) for e in enc})
        print(f"[swift] EncodePreprocessor(llava1_5_hf): encoded {encoded}/{n} rows, columns={enc.column_names},"
              f" image tokens per sample {counts} ({time.time() - t0:.1f}s)")
    except Exception as e:  # report, do not hide: the loader checks above still stand
        print(f"[swift] EncodePreprocessor path failed: {type(e).__name__}: {e}")
        traceback.print_exc()
        result["encode_error"] = f"{type(e).__name__}"
    result.update(read=len(train), images_resolved=resolved, text_ok=text_ok, roles_ok=roles_ok,
                  paths_ok=paths_ok, rule_checked=n, rule_ok=rule_ok, rule_fires=fires, encoded=encoded)
    return result


def main() -> int:
    mode, export, work = sys.argv[1], Path(sys.argv[2]).resolve(), Path(sys.argv[3]).resolve()
    work.mkdir(parents=True, exist_ok=True)
    expected_n = len(_expected(export, "taskgalaxy_swift.jsonl" if mode == "swift" else "taskgalaxy_llamafactory.json"))
    t0 = time.time()
    try:
        res = check_llamafactory(export, work) if mode == "llamafactory" else check_swift(export, work)
        res["error"] = None
    except Exception as e:
        traceback.print_exc()
        res = {"error": f"{type(e).__name__}: {str(e)[:200]}"}
    res["n"] = expected_n
    res["secs"] = round(time.time() - t0, 1)
    print("RESULT " + json.dumps(res, default=str))
    return 0 if res.get("error") is None else 1


if __name__ == "__main__":
    sys.exit(main())
