"""`taskgalaxy export --format F --out DIR` for every trainer's format (issue 23, items 1-2): each export is read
back with the rules of the trainer that reads it and gives the same samples (ids where the format has them,
question, answer, image bytes); placeholder tokens are counted per format; the LLaVA output is what it always
was; the `trl` config of `taskgalaxy push` loads with `load_dataset`.

One small finished run (the offline demo's stages, `--dry-run`, a handful of synthetic images) serves the module.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import datasets
import pytest

from taskgalaxy import main

CONFIG = """
run: {name: formats, shard_size: 16}
llm:
  endpoints:
    gpt4o: {model: gpt-4o-2024-08-06, image_max_side: 256}
stages:
  taxonomy: {levels: 2, rounds_per_level: 1, children_per_request: 3, new_first_level_per_round: 2, plots: false}
  images:
    sources: [{type: synthetic, count: 6, seed: 5}]
  match: {model: tg-tiny-clip, pretrained: null, top_k: 4}
  score:
    referees:
      - {name: tiny_llava, preset: tiny-random-llava, batch_size: 8}
  final: {threshold: 0}
"""
FORMATS = ["llava", "trl", "llamafactory", "swift", "internvl", "qwenvl"]
TOKEN = "<image>"


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("formats")
    (root / "formats.yaml").write_text(CONFIG)
    assert main(["run", str(root / "formats.yaml"), "--dry-run", "--run-dir", str(root / "run"), "--no-progress"]) == 0
    return root / "run"


@pytest.fixture(scope="module")
def expected(run) -> list[dict]:
    """The kept samples as the final stage holds them, read without the export's code."""
    from builder.outputs import load_stage_output
    from loaders.images.paths import trusted_image_resolver

    resolve = trusted_image_resolver(run)
    rows = sorted(load_stage_output(run, "final"), key=lambda r: r["id"])
    assert rows, "the demo run should keep some samples"
    return [{"id": r["id"], "question": r["conversations"][0]["value"].removeprefix(TOKEN + "\n"),
             "answer": r["conversations"][1]["value"], "bytes": resolve(r["image"]).read_bytes()} for r in rows]


def _export(run: Path, out: Path, fmt: str, *extra: str) -> int:
    return main(["export", str(run), "--format", fmt, "--out", str(out), *extra])


# -- reading each format back as its trainer does --------------------------------------------------------------
def _read_llava(out: Path) -> list[dict]:
    records = json.loads((out / "taskgalaxy_llava.json").read_text())
    return [{"id": r["id"], "question": r["conversations"][0]["value"].removeprefix(TOKEN + "\n"),
             "answer": r["conversations"][1]["value"], "bytes": (out / "images" / r["image"]).read_bytes()}
            for r in records]  # LLaVA: --image_folder DIR/images


def _read_trl(out: Path) -> list[dict]:
    ds = datasets.load_dataset(str(out), split="train")
    assert set(ds.column_names) == {"id", "messages", "images"}
    assert ds.features["images"] == datasets.List(datasets.Image())
    raw = ds.cast_column("images", datasets.List(datasets.Image(decode=False)))
    rows = []
    for row, undecoded in zip(ds, raw):
        user, assistant = row["messages"]
        assert user["role"] == "user" and [p["type"] for p in user["content"]] == ["image", "text"]
        assert assistant["role"] == "assistant" and row["images"][0].size[0] > 0
        rows.append({"id": row["id"], "question": user["content"][1]["text"],
                     "answer": assistant["content"][0]["text"], "bytes": undecoded["images"][0]["bytes"]})
    return rows


def _read_llamafactory(out: Path) -> list[dict]:
    (name, info), = json.loads((out / "dataset_info.json").read_text()).items()
    assert name == "taskgalaxy" and info["formatting"] == "sharegpt"
    columns, tags = info["columns"], info["tags"]
    rows = []
    for record in json.loads((out / info["file_name"]).read_text()):
        turns = record[columns["messages"]]
        assert [t[tags["role_tag"]] for t in turns] == [tags["user_tag"], tags["assistant_tag"]]
        images = record[columns["images"]]
        assert sum(t[tags["content_tag"]].count(TOKEN) for t in turns) == len(images) == 1
        rows.append({"question": turns[0][tags["content_tag"]].removeprefix(TOKEN + "\n"),
                     "answer": turns[1][tags["content_tag"]],
                     "bytes": (out / images[0]).read_bytes()})  # media_dir defaults to dataset_dir
    return rows


def _read_swift(out: Path) -> list[dict]:
    rows = []
    for line in (out / "taskgalaxy_swift.jsonl").read_text().splitlines():
        record = json.loads(line)
        user, assistant = record["messages"]
        assert (user["role"], assistant["role"]) == ("user", "assistant")
        assert user["content"].count(TOKEN) == len(record["images"]) == 1 and TOKEN not in assistant["content"]
        rows.append({"question": user["content"].removeprefix(TOKEN + "\n"), "answer": assistant["content"],
                     "bytes": (out / record["images"][0]).read_bytes()})  # relative to the working directory
    return rows


def _read_internvl(out: Path) -> list[dict]:
    from PIL import Image

    (name, meta), = json.loads((out / "meta.json").read_text()).items()
    assert name == "taskgalaxy" and meta["data_augment"] is False and meta["repeat_time"] == 1
    lines = Path(meta["annotation"]).read_text().splitlines()
    assert meta["length"] == len(lines)
    rows = []
    for line in lines:
        record = json.loads(line)
        human, gpt = record["conversations"]
        assert human["from"] == "human" and gpt["from"] == "gpt" and human["value"].startswith(TOKEN + "\n")
        assert human["value"].count(TOKEN) == 1 and TOKEN not in gpt["value"]
        path = os.path.join(meta["root"], record["image"])
        with Image.open(path) as image:
            assert image.size == (record["width"], record["height"])
        rows.append({"id": record["id"], "question": human["value"].removeprefix(TOKEN + "\n"),
                     "answer": gpt["value"], "bytes": Path(path).read_bytes()})
    return rows


def _read_qwenvl(out: Path) -> list[dict]:
    rows = []
    for record in json.loads((out / "taskgalaxy_qwenvl.json").read_text()):
        human, gpt = record["conversations"]
        assert (human["from"], gpt["from"]) == ("human", "gpt")
        assert human["value"].count(TOKEN) == 1 and TOKEN not in gpt["value"]
        rows.append({"question": human["value"].removeprefix(TOKEN + "\n"), "answer": gpt["value"],
                     "bytes": Path(os.path.join(out, record["image"])).read_bytes()})  # data_path: DIR
    return rows


READERS = {"llava": _read_llava, "trl": _read_trl, "llamafactory": _read_llamafactory, "swift": _read_swift,
           "internvl": _read_internvl, "qwenvl": _read_qwenvl}


@pytest.mark.parametrize("fmt", FORMATS)
def test_every_format_round_trips_to_the_same_samples(run, expected, tmp_path, fmt):
    out = tmp_path / fmt
    assert _export(run, out, fmt) == 0
    got = READERS[fmt](out)
    keys = set(got[0])
    assert [{k: e[k] for k in keys} for e in expected] == got  # sorted by id, as exported
    if fmt != "trl":  # the others link their images under DIR/images
        assert all(p.is_symlink() for p in (out / "images").rglob("*") if p.is_file())
    assert (out / "tasktype.txt").is_file()


def test_a_second_export_to_the_same_folder_gives_the_same_files(run, tmp_path):
    for fmt in ("trl", "swift"):
        out = tmp_path / fmt
        assert _export(run, out, fmt) == 0
        first = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
        assert _export(run, out, fmt) == 0
        assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == first


def test_copy_images_writes_files_not_links(run, expected, tmp_path):
    out = tmp_path / "copied"
    assert _export(run, out, "qwenvl", "--copy-images") == 0
    files = [p for p in (out / "images").rglob("*") if p.is_file()]
    assert files and not any(p.is_symlink() for p in files)
    assert [e["bytes"] for e in expected] == [r["bytes"] for r in _read_qwenvl(out)]


def test_the_llava_output_is_what_export_always_wrote(run, tmp_path):
    """--llava OUT.json and --format llava write the bytes the export wrote before the formats existed."""
    from builder.outputs import load_stage_output
    from processors.qa.validate import strip_control

    def printable(value):
        if isinstance(value, str):
            return strip_control(value)
        if isinstance(value, list):
            return [printable(v) for v in value]
        return {k: printable(v) for k, v in value.items()} if isinstance(value, dict) else value

    before = sorted(({k: printable(r[k]) if k in ("task_type", "conversations") else r[k]
                      for k in ("id", "image", "task_type", "conversations")} for r in load_stage_output(run, "final")),
                    key=lambda r: r["id"])
    old_bytes = json.dumps(before, ensure_ascii=False, indent=1).encode("utf-8")
    assert main(["export", str(run), "--llava", str(tmp_path / "a" / "data.json")]) == 0
    assert main(["export", str(run), "--out", str(tmp_path / "b")]) == 0  # llava is the default format
    assert (tmp_path / "a" / "data.json").read_bytes() == old_bytes
    assert (tmp_path / "b" / "taskgalaxy_llava.json").read_bytes() == old_bytes


def _rendered(fmt, samples, context):
    """``fmt.render``'s files with their bytes, each file's content taken as it is yielded (as the export does)."""
    import io

    from processors.publish.formats.base import OutFile

    for file in fmt.render(samples, context):
        if callable(file.data):
            buffer = io.BytesIO()
            file.data(buffer)
            file = OutFile(file.path, buffer.getvalue(), file.what)
        yield file


# -- a literal <image> in a question never becomes a second image token ----------------------------------------
def test_a_literal_placeholder_in_the_text_is_neutralised_in_every_format(tmp_path):
    from processors.publish.formats import FORMATS as TABLE
    from processors.publish.formats.base import Context
    from processors.publish.records import sample_from_row

    row = {"id": "tg-1", "image": "toy/a.png", "task_type": "OCR~Tags",
           "conversations": [{"from": "human", "value": "<image>\nWhat does the <image> tag in <video> mean?"},
                             {"from": "gpt", "value": "It embeds an <image>."}]}
    sample = sample_from_row(row, {"width": 4, "height": 4})
    assert sample.question == "What does the < image> tag in < video> mean?" and sample.answer == "It embeds an < image>."
    assert sample.neutralized == 3
    picture = tmp_path / "a.png"
    from PIL import Image

    Image.new("RGB", (4, 4)).save(picture)
    sample.file = picture
    import io

    import pyarrow.parquet as pq

    for name, fmt in TABLE.items():
        files = list(_rendered(fmt, [sample], Context(tmp_path, "taskgalaxy", fmt.main_name)))
        if name == "trl":
            (messages,) = pq.read_table(io.BytesIO(files[0].data)).column("messages").to_pylist()
            texts = [p["text"] or "" for turn in messages for p in turn["content"]]
            assert sum(t.count(TOKEN) for t in texts) == 0  # the image is a typed part, not a token
            assert [p["type"] for p in messages[0]["content"]].count("image") == 1
            continue
        text = files[0].data.decode()
        assert text.count(TOKEN) == 1, name  # the one image's token, nothing from the question or answer
        assert "< image> tag in < video>" in text and "<video>" not in text, name


def test_image_root_is_for_llava_only_and_out_or_llava_is_needed(run, tmp_path, capsys):
    assert _export(run, tmp_path / "x", "swift", "--image-root", str(tmp_path / "imgs")) == 2
    assert "--image-root is for the LLaVA format only" in capsys.readouterr().err
    assert main(["export", str(run), "--format", "trl"]) == 2
    assert main(["export", str(run), "--format", "trl", "--llava", str(tmp_path / "y.json")]) == 2
    assert not (tmp_path / "x").exists() and not (tmp_path / "y.json").exists()


# -- review items: streamed TRL shards, one file name per format, --out outside the run, a light parser ---------
@pytest.mark.parametrize("limit", [("MAX_SHARD_ROWS", 2), ("MAX_SHARD_BYTES", 1)])
def test_the_trl_export_writes_each_bounded_shard_as_render_yields_it(run, expected, tmp_path, monkeypatch, limit):
    """No shard is built in memory (``to_parquet`` writes to the staged file's handle), each is written before
    the next is rendered, and a shard holds at most MAX_SHARD_ROWS rows / MAX_SHARD_BYTES of table (at least one
    row): the folder is several Parquet files that ``load_dataset`` reads back whole."""
    from dataclasses import replace

    from builder.runfolder import TMP_PREFIX
    from processors.publish.formats import FORMATS as TABLE
    from processors.publish.formats import trl
    from processors.publish.formats.base import OutFile

    monkeypatch.setattr(trl, *limit)
    out, at, written = tmp_path / "trl", {}, []

    def streamed(samples, context):
        for index, file in enumerate(trl.render(samples, context)):
            assert callable(file.data), "a TRL shard is written to its staged file, not returned as bytes"
            if index:  # the previous shard is already on disk, staged, before this one was rendered
                assert written == list(range(index))
                assert list((out / "data").glob(f"{TMP_PREFIX}train-{index - 1:05d}-*"))
            at["index"] = index

            def write(handle, file=file, index=index):
                assert at["index"] == index, "the export took the files' contents after rendering them all"
                file.data(handle)
                written.append(index)

            yield OutFile(file.path, write, file.what)

    monkeypatch.setitem(TABLE, "trl", replace(TABLE["trl"], render=streamed))
    assert _export(run, out, "trl") == 0
    n = len(expected)
    shards = sorted((out / "data").glob("train-*.parquet"))
    assert len(shards) == (-(-n // 2) if limit[0] == "MAX_SHARD_ROWS" else n) >= 2
    assert written == list(range(len(shards)))
    assert not list(out.rglob(f"{TMP_PREFIX}*")) and not list(tmp_path.glob(f"{TMP_PREFIX}*"))
    got = _read_trl(out)
    assert [{k: e[k] for k in got[0]} for e in expected] == got
    monkeypatch.setattr(trl, "MAX_SHARD_ROWS", 10**6)
    monkeypatch.setattr(trl, "MAX_SHARD_BYTES", 10**12)
    assert _export(run, out, "trl") == 0  # fewer shards now: the earlier export's extra ones are removed
    assert [p.name for p in (out / "data").iterdir()] == ["train-00000-of-00001.parquet"]
    assert _read_trl(out) == got


def test_every_format_exported_into_one_folder_stays_valid(run, expected, tmp_path):
    """Each format's files are named after it (dataset_info.json and meta.json point at their own), so six
    exports into one folder leave six readable datasets."""
    out = tmp_path / "all"
    for fmt in FORMATS:
        assert _export(run, out, fmt) == 0
    names = {p.name for p in out.iterdir()}
    assert {"taskgalaxy_llava.json", "taskgalaxy_llamafactory.json", "taskgalaxy_qwenvl.json",
            "taskgalaxy_swift.jsonl", "taskgalaxy_internvl.jsonl", "dataset_info.json", "meta.json", "data",
            "images", "tasktype.txt", "browser"} == names  # browser/: the LLaVA export's sample browser
    info, meta = (json.loads((out / name).read_text())["taskgalaxy"] for name in ("dataset_info.json", "meta.json"))
    assert info["file_name"] == "taskgalaxy_llamafactory.json"
    assert meta["annotation"] == str(out / "taskgalaxy_internvl.jsonl")
    for fmt in FORMATS:
        got = READERS[fmt](out)
        assert [{k: e[k] for k in got[0]} for e in expected] == got, fmt


@pytest.mark.parametrize("fmt", FORMATS)
def test_an_output_folder_in_the_run_folder_is_refused_for_every_format(run, tmp_path, capsys, fmt):
    (tmp_path / "link-to-run").symlink_to(run)

    def tree():
        return sorted(str(p.relative_to(run)) for p in run.rglob("*"))

    before = tree()
    for where in (run / "exported", tmp_path / "link-to-run" / "x", run):
        assert _export(run, where, fmt) == 2
        err = capsys.readouterr().err
        assert f"the output folder {where}" in err and f"lies in the run folder {run}" in err
        assert "nothing was written" in err and "Traceback" not in err
        assert tree() == before
    if fmt == "llava":
        outside = tmp_path / "imgs"
        assert main(["export", str(run), "--llava", str(run / "data.json"), "--image-root", str(outside)]) == 2
        assert "lies in the run folder" in capsys.readouterr().err and not outside.exists() and tree() == before


def test_the_output_folder_in_the_image_store_is_refused(run, tmp_path):
    from loaders.images.paths import trusted_image_resolver
    from processors.publish.export import ImageRootError, export

    store = tmp_path / "store"
    store.mkdir()
    with pytest.raises(ImageRootError, match=f"the output folder {store / 'x'} lies in the run's image store"):
        export(run, "trl", store / "x", resolve_image=trusted_image_resolver(run), protected=[store])
    assert list(store.iterdir()) == []


def test_the_parser_names_the_formats_without_importing_them():
    """--format's choices come from a plain tuple, equal to FORMATS; building the parser imports no writer."""
    import subprocess
    import sys

    from processors.publish import FORMAT_NAMES
    from processors.publish.formats import FORMATS as TABLE

    assert FORMAT_NAMES == tuple(TABLE) and list(FORMAT_NAMES) == FORMATS
    code = ("import sys, taskgalaxy; parser = taskgalaxy.build_parser(); "
            "assert not [m for m in sys.modules if m.startswith('processors.publish.formats')], sorted(sys.modules); "
            "args = parser.parse_args(['export', 'RUN', '--format', 'qwenvl', '--out', 'D']); "
            "assert args.format == 'qwenvl'")
    done = subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).parents[3], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]


# -- the Hub layout's trl config ---------------------------------------------------------------------------------
def test_push_lays_out_a_trl_config_that_load_dataset_reads(run, expected, tmp_path):
    repo = tmp_path / "hub"
    assert main(["push", str(run), "--local-dir", str(repo)]) == 0
    trl = datasets.load_dataset(str(repo), "trl", split="train")
    assert trl.features["images"] == datasets.List(datasets.Image())
    assert trl["id"] == [e["id"] for e in expected]
    assert [m[0]["content"][1]["text"] for m in trl["messages"]] == [e["question"] for e in expected]
    raw = trl.cast_column("images", datasets.List(datasets.Image(decode=False)))
    assert [r[0]["bytes"] for r in raw["images"]] == [e["bytes"] for e in expected]
    final = datasets.load_dataset(str(repo), split="train")  # `final` stays the default config
    assert "conversations" in final.column_names
    card = (repo / "README.md").read_text()
    assert "config_name: trl" in card and "## Train with TRL" in card and 'load_dataset(REPO, "trl"' in card


@pytest.mark.parametrize("token", ["<|image_pad|>", "<|im_end|>", "<|vision_start|>", "<IMG_CONTEXT>", "<img>",
                                   "</img>"])
def test_chat_template_tokens_in_the_text_are_neutralised_too(tmp_path, token):
    """Qwen's processor expands each <|image_pad|> per image (one more than the images: an index error), an
    <|im_end|> in an answer ends the turn where qwen-vl-finetune masks the labels, InternVL places image
    features at each <IMG_CONTEXT>: none may reach a trainer as the token itself."""
    from processors.publish.formats import FORMATS as TABLE
    from processors.publish.formats.base import Context
    from processors.publish.records import sample_from_row

    row = {"id": "tg-1", "image": "toy/a.png", "task_type": "OCR~Tags",
           "conversations": [{"from": "human", "value": f"<image>\nWhat does {token} mean?"},
                             {"from": "gpt", "value": f"It is {token}, a token."}]}
    sample = sample_from_row(row, {"width": 4, "height": 4})
    spaced = "< " + token[1:]
    assert sample.question == f"What does {spaced} mean?" and sample.answer == f"It is {spaced}, a token."
    assert sample.neutralized == 2
    from PIL import Image

    Image.new("RGB", (4, 4)).save(tmp_path / "a.png")
    sample.file = tmp_path / "a.png"
    for name, fmt in TABLE.items():
        if name == "trl":
            continue  # parquet: its text is the sample's question and answer, checked above
        files = list(_rendered(fmt, [sample], Context(tmp_path, "taskgalaxy", fmt.main_name)))
        text = files[0].data.decode()  # the format's records (JSON writes < and | as they are)
        assert token not in text and spaced in text, name


def test_a_first_turn_that_does_not_open_with_the_image_token_gets_it_once_in_llava(tmp_path):
    """A final stage of another pipeline ("Q1 <image>"): its <image> is neutralised like any other, and the
    record still asks for its one image, at the start where every other format puts it."""
    from processors.publish.records import sample_from_row

    row = {"id": "tg-2", "image": "toy/a.png", "task_type": "OCR~Tags",
           "conversations": [{"from": "human", "value": "Q1 <image>"}, {"from": "gpt", "value": "A1"}]}
    sample = sample_from_row(row, {"width": 4, "height": 4})
    (human, gpt) = sample.llava()["conversations"]
    assert human["value"] == "<image>\nQ1 < image>" and gpt["value"] == "A1" and sample.question == "Q1 < image>"
    assert json.dumps(sample.llava()).count("<image>") == 1
