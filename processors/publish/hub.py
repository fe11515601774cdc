"""``taskgalaxy push``: every stage of a run as one config of a Hub dataset repo, plus LLaVA JSON and a card.

The repo is first laid out in a local folder — ``<stage>/train-0000k-of-0000n.parquet`` per stage, images
embedded as bytes in ``images`` and ``final``, the kept samples in TRL's shape as the ``trl`` config (``messages``
+ embedded ``images``, what TRL's ``SFTTrainer`` reads), every stage's failures as the ``failures`` config, the LLaVA
JSON and ``tasktype.txt`` under ``llava/``, and a README whose YAML ``configs:`` make each folder a config
(``final`` the default). ``--local-dir`` stops there; ``--repo-id`` uploads that exact folder with
``upload_folder`` (resumable) and tags the commit, so the Hub copy and the local copy cannot differ.
``load_dataset(folder, config)`` reads every config back, exactly as from the Hub.
"""

from __future__ import annotations

import logging
import math
import os
import shutil
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path

import datasets

from builder.outputs import load_stage_failures, load_stage_output, require_intact_stage, run_states
from builder.runfolder import TMP_PREFIX, plain_mode
from builder.stage import Stage
from processors.publish.card import render_card
from processors.publish.export import export_llava
from processors.publish.formats import trl as trl_format
from processors.publish.records import read_samples
from processors.publish.writes import OutputWriteError, write_failure

logger = logging.getLogger(__name__)

EMBED_IMAGES = {"images": "path", "final": "image"}  # config -> column holding the images-stage path
TRL_CONFIG = "trl"  # the kept samples as TRL's SFTTrainer reads them (beside `final`)
MAX_SHARD_BYTES = 500 * 1024 * 1024
BROWSER = "browser/index.html"  # the static sample browser, when the CLI's extras wrote one


def build_repo_folder(run_dir: Path, out_dir: Path, *, resolve_image: Callable[[str], Path],
                      extras: Callable[[Path], None] | None = None, stages: Sequence[Stage] = ()) -> list[dict]:
    """Write the Hub layout of ``run_dir`` into ``out_dir``; returns what each config holds.

    ``extras(folder)`` adds files to the layout before the card is written (the CLI passes the sample
    browser's writer); they appear, and are replaced, with the rest. ``stages``: the pipeline's stages, whose
    descriptions the card shows.

    All or nothing: everything is checked first (a folder of someone else's at ``out_dir``, damaged shards,
    image roots the run's config does not vouch for), then laid out in a hidden folder beside ``out_dir`` and
    renamed into place; a refusal or a failure leaves ``out_dir`` as it was and nothing beside it."""
    states = [s for s in run_states(run_dir) if s.get("done")]
    if not states:
        raise ValueError(f"{run_dir} has no finished stage to publish; run `taskgalaxy run` first")
    _refuse_foreign_folder(out_dir)
    for state in states:
        require_intact_stage(run_dir, state["stage"])
    datasets.disable_progress_bars()  # to_parquet's bars, one per config, would drown the summary
    doing = _Doing("make a folder for the layout", out_dir)
    staging = None
    try:
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        staging = plain_mode(Path(tempfile.mkdtemp(prefix=f"{TMP_PREFIX}{out_dir.name}-", dir=out_dir.parent)))
        configs = _lay_out(run_dir, staging, states, resolve_image, extras, doing, stages)
        doing("move the finished layout into place", out_dir)
        _swap_into_place(staging, out_dir)
    except BaseException as exc:
        if staging is not None:
            shutil.rmtree(staging, ignore_errors=True)
        failure = _write_failure(exc, doing, staging, out_dir)
        if failure is None:
            raise
        raise failure from exc
    return configs


class _Doing:
    """The step of the layout under way (what, where), for the message if a write fails."""

    def __init__(self, what: str, path: Path):
        self(what, path)

    def __call__(self, what: str, path: Path) -> None:
        self.what, self.path = what, Path(path)


def _write_failure(exc: BaseException, doing: _Doing, staging: Path | None, out_dir: Path) -> OutputWriteError | None:
    """A write that failed while laying out (a full disk, ...) as one paragraph naming the file as it would
    have been in ``out_dir``; None for anything else (a refusal, a bug: raised as it is)."""
    if isinstance(exc, OutputWriteError) and isinstance(exc.__cause__, OSError):
        original, what, path = exc.__cause__, exc.doing, exc.path  # the LLaVA JSON or the browser
    elif isinstance(exc, OSError) and exc.errno is not None:
        original, what, path = exc, doing.what, doing.path
    else:
        return None
    if staging is not None and path.is_relative_to(staging):
        path = out_dir / path.relative_to(staging)
    laid_out = f" (it was being laid out in {staging} first; that folder was removed)" if staging else ""
    return write_failure(original, doing=what, path=path, command="`taskgalaxy push`",
                         outcome=f"Nothing was published: {out_dir} is as it was{laid_out}, and nothing was "
                                 "uploaded.")


def _lay_out(run_dir: Path, out_dir: Path, states: list[dict], resolve_image, extras=None,
             doing: _Doing | None = None, stages: Sequence[Stage] = ()) -> list[dict]:
    doing = doing or _Doing("lay out", out_dir)
    doing("write", out_dir / MARKER)
    (out_dir / MARKER).write_text("laid out by taskgalaxy push; may be replaced by the next push\n")
    scratch = out_dir / SCRATCH  # `datasets` cache files of the embedding step: never in the run folder
    configs = []
    for state in states:
        name = state["stage"]
        dataset = load_stage_output(run_dir, name)
        if name in EMBED_IMAGES:
            doing(f"embed the images of config {name!r}", scratch / f"{name}.arrow")
            dataset = _with_embedded_images(dataset, EMBED_IMAGES[name], resolve_image, scratch / f"{name}.arrow")
        doing(f"write the Parquet files of config {name!r}", out_dir / name)
        configs.append(_config_entry(name, dataset, out_dir))
        del dataset
        shutil.rmtree(scratch, ignore_errors=True)  # written to Parquet: a second copy of every image no more
    failures = datasets.concatenate_datasets([load_stage_failures(run_dir, s["stage"]) for s in states])
    doing("write the Parquet files of config 'failures'", out_dir / "failures")
    configs.append(_config_entry("failures", failures, out_dir))
    if any(s["stage"] == "final" for s in states):
        doing("write the Parquet files of config 'trl'", out_dir / TRL_CONFIG)
        configs.append(_trl_config(run_dir, out_dir, resolve_image, scratch))
        # the images travel embedded in the `final` config; the JSON's paths are the images stage's
        export_llava(run_dir, out_dir / "llava" / "taskgalaxy_llava.json", resolve_image=resolve_image,
                     place_images=False)
    doing("copy the plots", out_dir / "plots")
    _copy_plots(run_dir, out_dir / "plots")
    doing("copy the reports", out_dir / "reports")
    _copy_reports(run_dir, out_dir / "reports")
    if extras is not None and any(s["stage"] == "final" for s in states):
        doing("add the sample browser", out_dir)
        extras(out_dir)
    browser = (out_dir / BROWSER).is_file()
    doing("write the dataset card", out_dir / "README.md")
    (out_dir / "README.md").write_text(render_card(run_dir, configs, states, stages=stages, browser=browser), encoding="utf-8")
    return configs


def _trl_config(run_dir: Path, out_dir: Path, resolve_image, scratch: Path) -> dict:
    """The ``trl`` config: the kept samples in TRL's shape (``processors.publish.formats.trl``), images embedded."""
    samples = read_samples(run_dir, resolve_image)
    try:
        return _config_entry(TRL_CONFIG, trl_format.dataset(samples, scratch / "trl.arrow"), out_dir)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


MARKER = ".taskgalaxy-repo"  # marks a folder this module laid out, the only kind it will ever replace
SCRATCH = ".scratch"


def _refuse_foreign_folder(out_dir: Path) -> None:
    """``out_dir`` may be replaced only if it is missing, empty, or was laid out by us before."""
    if out_dir.exists() and not out_dir.is_dir():
        raise ValueError(f"{out_dir} exists and is not a folder; give --local-dir a new or empty folder")
    if out_dir.exists() and any(out_dir.iterdir()) and not (out_dir / MARKER).exists():
        raise ValueError(f"{out_dir} exists and is not a folder written by `taskgalaxy push`; refusing to "
                         "overwrite it: give --local-dir a new or empty folder")


def _swap_into_place(staging: Path, out_dir: Path) -> None:
    """Rename the finished layout to ``out_dir``; an earlier layout there is moved aside first and removed
    after, or put back if the rename fails."""
    if not out_dir.exists():
        os.rename(staging, out_dir)
        return
    _refuse_foreign_folder(out_dir)  # again, right before replacing it
    aside = Path(tempfile.mkdtemp(prefix=f"{TMP_PREFIX}old-{out_dir.name}-", dir=out_dir.parent))
    try:
        os.rename(out_dir, aside / "old")
    except BaseException:
        aside.rmdir()  # nothing was moved: no empty folder left beside it
        raise
    try:
        os.rename(staging, out_dir)
    except BaseException:
        os.rename(aside / "old", out_dir)
        aside.rmdir()
        raise
    shutil.rmtree(aside, ignore_errors=True)


def _with_embedded_images(dataset: datasets.Dataset, column: str, resolve_image,
                          cache_file: Path) -> datasets.Dataset:
    """Add an ``image`` column (``datasets.Image``) whose bytes are read from the files, and keep the path.
    The embedded table is written to ``cache_file`` (beside the layout): the run folder is only read, and may
    be read-only."""
    target = "image"
    if column == target:  # the LLaVA path column keeps its meaning under a clearer name
        dataset = dataset.rename_column(column, "image_path")
        column = "image_path"
    files = [str(resolve_image(p)) for p in dataset[column]]
    dataset = dataset.add_column(target, files).cast_column(target, datasets.Image())
    return trl_format.embed_files(dataset, cache_file)


def _config_entry(name: str, dataset: datasets.Dataset, out_dir: Path) -> dict:
    """Write one config's Parquet and describe it for the card (``dataset_info``: features and split sizes —
    `datasets` keys its cache of a local folder on these, so a re-push to the same folder is not served stale)."""
    files = _write_parquet(dataset, out_dir / name)
    info = datasets.DatasetInfo(features=dataset.features, splits=datasets.SplitDict(
        {"train": datasets.SplitInfo(name="train", num_bytes=dataset.data.nbytes, num_examples=len(dataset))}))
    return {"name": name, "rows": len(dataset), "files": files, "info": info._to_yaml_dict()}


def _write_parquet(dataset: datasets.Dataset, folder: Path) -> list[str]:
    folder.mkdir(parents=True, exist_ok=True)
    shards = max(1, math.ceil(dataset.data.nbytes / MAX_SHARD_BYTES))
    names = []
    for index in range(shards):
        name = f"train-{index:05d}-of-{shards:05d}.parquet"
        dataset.shard(shards, index, contiguous=True).to_parquet(str(folder / name))
        names.append(name)
    return names


def _copy_plots(run_dir: Path, target: Path) -> None:
    for plot in sorted(run_dir.glob("[0-9][0-9]_*/*.png")):
        target.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(plot, target / plot.name)


def _copy_reports(run_dir: Path, target: Path) -> None:
    """Tables a stage wrote for readers of the data (e.g. the final stage's per-leaf coverage CSV)."""
    for report in sorted(run_dir.glob("[0-9][0-9]_*/*.csv")):
        target.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(report, target / report.name)


def push_to_hub(folder: Path, repo_id: str, *, tag: str | None = None, private: bool = False) -> str:
    """Upload the laid-out folder as a dataset repo and tag it; returns the commit URL.

    The token comes from huggingface_hub's usual places (``HF_TOKEN`` or ``hf auth login``); it never
    reaches the card or a log line.
    """
    from huggingface_hub import HfApi

    api = HfApi()
    api.create_repo(repo_id, repo_type="dataset", private=private, exist_ok=True)
    commit = api.upload_folder(
        repo_id=repo_id,
        repo_type="dataset",
        folder_path=str(folder),
        commit_message=f"TaskGalaxy build{f' {tag}' if tag else ''}",
        delete_patterns=["*/train-*.parquet"],  # a config with fewer shards than before leaves no stale file
    )
    if tag:
        api.create_tag(repo_id, repo_type="dataset", tag=tag, revision=getattr(commit, "oid", None), exist_ok=False)
    logger.info("pushed %s to the Hub as %s%s", folder, repo_id, f" (tag {tag})" if tag else "")
    return str(getattr(commit, "commit_url", commit))
