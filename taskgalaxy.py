"""TaskGalaxy builder: the public face.

- ``TaskGalaxy``: a `datasets` builder over a run folder, one config per stage, so any stage loads as a
  ``Dataset`` with its ``Features``::

      builder = TaskGalaxy(config_name="match", data_dir="runs/demo")
      builder.download_and_prepare()
      ds = builder.as_dataset(split="train")

- ``main(argv)``: the ``taskgalaxy`` command line (``run``, ``status``, ``estimate``, ``export``, ``push``,
  ``audit``, ``simulate-api``; see ``taskgalaxy --help``).
"""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
import threading
from pathlib import Path

import datasets

from builder.outputs import load_stage_output, stage_state
from processors.stopping import leaving, stop_on_sigterm, stopped

logger = logging.getLogger("taskgalaxy")


class TaskGalaxy(datasets.GeneratorBasedBuilder):
    """Reads one stage of a run folder (``data_dir``) as a `datasets` dataset with a single ``train`` split.

    The builder's cache hash is the stage's fingerprint, so a recomputed stage is never served stale.
    """

    # No fixed BUILDER_CONFIGS: the config name is any stage that exists in the run folder (the product's are
    # in processors.pipeline.default_stages); an unknown one is refused by ``stage_state`` with a message saying
    # how to produce it.
    DEFAULT_CONFIG_NAME = "final"

    def __init__(self, config_name: str | None = None, *, data_dir: str | None = None, **kwargs):
        if data_dir is None:
            raise ValueError("TaskGalaxy needs data_dir=<run folder>, e.g. TaskGalaxy('match', data_dir='runs/demo')")
        name = config_name or self.DEFAULT_CONFIG_NAME
        _, state = stage_state(Path(data_dir), name)
        kwargs.setdefault("hash", state["fingerprint"])
        self._state = state
        super().__init__(config_name=name, data_dir=data_dir, **kwargs)

    def _info(self) -> datasets.DatasetInfo:
        return datasets.DatasetInfo(
            description=f"TaskGalaxy stage {self.config.name!r} of run {self.config.data_dir}",
            features=datasets.Features.from_dict(self._state["features"]),
        )

    def _split_generators(self, dl_manager):
        return [datasets.SplitGenerator(name=datasets.Split.TRAIN, gen_kwargs={})]

    def _generate_examples(self):
        output = load_stage_output(Path(self.config.data_dir), self.config.name)
        for index, row in enumerate(output):
            yield index, row


# --------------------------------------------------------------------------------------------- CLI
def _spend_cap_of(exc: BaseException):
    """The ``SpendCapReached`` behind ``exc`` (the runner wraps a shard's error), or None."""
    from processors.llm.errors import SpendCapReached

    while exc is not None and not isinstance(exc, SpendCapReached):
        exc = exc.__cause__
    return exc


def _cmd_run(args: argparse.Namespace) -> int:
    from processors.session import dry_run_services, open_run

    from builder.runner import UnansweredError
    from builder.status import format_table, stage_summaries

    only = {s.strip() for s in args.stages.split(",") if s.strip()} if args.stages else None
    with dry_run_services(args.dry_run) as services:
        runner = open_run(args.config, run_dir=args.run_dir, dry_run=args.dry_run, services=services,
                          progress=not args.no_progress, engine=args.engine, ray_address=args.ray_address,
                          accept_unanswered=args.accept_unanswered)
        runner.progress_interval = args.progress_interval
        logger.info("run folder: %s", runner.run_dir)
        try:
            runner.run(only)
        except UnansweredError as exc:  # every shard ran: show what was done, then what is left to ask
            print(format_table(runner.run_dir, stage_summaries(runner.run_dir)))
            print(f"error: {exc}", file=sys.stderr)
            return exc.exit_code
        except Exception as exc:
            if _spend_cap_of(exc) is not None:  # what each stage spent, before main() says which cap stopped it
                print(format_table(runner.run_dir, stage_summaries(runner.run_dir)))
            raise
    print(format_table(runner.run_dir, stage_summaries(runner.run_dir)))
    return 0


def _cmd_status(args: argparse.Namespace) -> int:
    from builder.status import format_table, stage_summaries

    run_dir = Path(args.run_dir)
    if not run_dir.is_dir():
        print(f"error: no run folder at {run_dir}", file=sys.stderr)
        return 2
    if args.watch or args.once:
        from builder.watch import watch

        return watch(run_dir, interval=args.interval, once=args.once)
    summaries = stage_summaries(run_dir)
    if args.json:
        print(json.dumps(summaries, indent=2))
        return 0
    from processors.llm.encoded_store import status_line
    from processors.quality.audit_text import status_lines

    store = status_line(run_dir / "cache")
    print("\n".join([format_table(run_dir, summaries), *status_lines(run_dir), *([store] if store else [])]))
    return 0


def _cmd_estimate(args: argparse.Namespace) -> int:
    from builder.outputs import StageNotReadyError
    from processors.estimate import Assumptions, estimate, format_estimate
    from processors.llm.flex import warn_if_unpriced
    from processors.session import default_run_dir, load_run_config
    from processors.pipeline import default_stages

    config = load_run_config(args.config)
    for name in config.llm.endpoints:  # a paid model without a price would be estimated at $0
        warn_if_unpriced(config.llm, name)
    images = args.images
    for dry_run in (False, True):  # a finished images stage, of the real run or of a dry run, knows the count
        if images is None:
            try:
                images = len(load_stage_output(default_run_dir(config, dry_run=dry_run), "images"))
            except StageNotReadyError:
                pass
    if images is None:
        print("error: say how many images to expect with --images N (or run the images stage first: "
              f"taskgalaxy run {args.config} --stages images --dry-run)", file=sys.stderr)
        return 2
    if args.from_run:  # projected from what a pilot run did, not from fixed assumptions
        from processors.estimate_pilot import format_pilot_estimate, project_from_run

        try:
            print(format_pilot_estimate(project_from_run(Path(args.from_run), config, images,
                                                         latency_s=args.latency_s)))
        except (StageNotReadyError, ValueError) as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        return 0
    assumptions = Assumptions(images=images, kept_per_image=args.kept_per_image, filter_pass=args.filter_pass)
    print(format_estimate(estimate(config, assumptions, default_stages()), assumptions))
    return 0


def _cmd_simulate(args: argparse.Namespace) -> int:
    from processors.pipeline import default_responders
    from processors.simulator.thread import main_from_args

    return main_from_args(args, default_responders())


def _image_resolver(run_dir: Path):
    from loaders.images.paths import trusted_image_resolver

    return trusted_image_resolver(run_dir)  # only files under the roots the run's config named


def _cmd_export(args: argparse.Namespace) -> int:
    from processors.publish.export import ImageRootError, export

    run_dir = Path(args.run_dir)
    if (args.llava is None) == (args.out is None) or (args.llava and args.format not in (None, "llava")):
        print("error: give --out DIR (with --format), or --llava OUT.json for the LLaVA JSON", file=sys.stderr)
        return 2
    out = Path(args.llava) if args.llava else Path(args.out)
    try:
        result = export(run_dir, args.format or "llava", out.parent if args.llava else out,
                        main_name=out.name if args.llava else None, resolve_image=_image_resolver(run_dir),
                        image_root=Path(args.image_root) if args.image_root else None,
                        copy_images=args.copy_images, protected=_image_store(run_dir))
    except ImageRootError as exc:  # a usage error, like a bad config: nothing was written
        print(f"error: {exc}", file=sys.stderr)
        return 2
    images = f"images under {result.image_root}" if result.image_root else "images embedded"
    print(f"wrote {result.samples} samples ({result.format}) to {result.json_path}; {images}"
          + (f"; task types in {result.tasktype_path}" if result.tasktype_path else ""))
    if result.format == "llava":
        browser = _browser_writer(run_dir)(result.json_path.parent)  # resolved: `out/../x.json` makes no `out`
        print(f"sample browser: open {browser} in a web browser")
    return 0


def _export_formats() -> list[str]:
    from processors.publish import FORMAT_NAMES  # not the formats themselves: TRL's imports `datasets`

    return list(FORMAT_NAMES)


def _image_store(run_dir: Path) -> list[Path]:
    """The folder the images stage stores the images it wrote (``store_dir``, by default inside the run
    folder): an export must not put its links there."""
    from loaders.images.paths import STORE_ROOT, load_roots

    try:
        store = load_roots(run_dir).get(STORE_ROOT)
    except (OSError, ValueError):  # no images stage, or a damaged roots file: the export names that itself
        return []
    return [store] if store is not None else []


def _browser_writer(run_dir: Path):
    """Writes the static sample browser into ``<folder>/browser/`` (the export's folder or the Hub layout)."""
    from processors.quality.browser import write_browser

    resolver = _image_resolver(run_dir)
    return lambda folder: write_browser(run_dir, Path(folder) / "browser", resolver)


def _cmd_push(args: argparse.Namespace) -> int:
    import tempfile

    from processors.pipeline import default_stages
    from processors.publish.hub import build_repo_folder, push_to_hub

    run_dir = Path(args.run_dir)
    if args.local_dir:
        configs = build_repo_folder(run_dir, Path(args.local_dir), resolve_image=_image_resolver(run_dir),
                                    extras=_browser_writer(run_dir), stages=default_stages())
        print(f"wrote {len(configs)} configs to {args.local_dir}: " + ", ".join(c["name"] for c in configs))
        return 0
    with tempfile.TemporaryDirectory(prefix="taskgalaxy-push-") as tmp:
        build_repo_folder(run_dir, Path(tmp) / "repo", resolve_image=_image_resolver(run_dir),
                          extras=_browser_writer(run_dir), stages=default_stages())
        url = push_to_hub(Path(tmp) / "repo", args.repo_id, tag=args.tag, private=args.private)
    print(f"pushed to {url}")
    return 0


def _cmd_audit(args: argparse.Namespace) -> int:
    from processors.quality import audit_text

    run_dir, out = Path(args.run_dir), args.out and Path(args.out)
    try:
        if not run_dir.is_dir():
            raise ValueError(f"no run folder at {run_dir}")
        if args.sample is not None:
            if args.sample < 1 or out is None or args.json:
                raise ValueError("--sample N needs N >= 1 and --out DIR (the labelling page's folder); --json "
                                 "goes with --labels")
            from processors.quality.audit_sample import write_audit

            manifest = write_audit(run_dir, args.sample, out, stratify=args.stratify or "category",
                                   seed=args.seed or 0)
            print(audit_text.sample_instructions(run_dir, out, manifest))
            return 0
        if (args.out, args.stratify, args.seed) != (None, None, None):
            raise ValueError("--out, --stratify and --seed go with --sample, not with --labels")
        from processors.quality.audit_labels import compute_audit

        figures = compute_audit(run_dir, [Path(p) for p in args.labels])
    except ValueError as exc:  # bad labels (AuditError), no sample of this run, a run without score/final
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # the run folder or the page's folder cannot be written: path, cause, fix
        from builder.runfolder import folder_error

        doing = ("read the run or write the audit sample and its page" if args.sample is not None
                 else "read the run or write the audit's figures")
        hint = (f"Check that this user can write {run_dir / 'audit'}" + (f" and {out}" if out else "")
                + " (no file where a folder goes, a disk with room), then run the same command again"
                + (": the same --sample, --stratify and --seed draw the same sample." if out else "."))
        raise folder_error(exc, doing=doing, path=run_dir, run_dir=run_dir, hint=hint) from None
    print(json.dumps(figures, indent=2) if args.json else audit_text.format_figures(figures))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="taskgalaxy", description=__doc__.split("\n")[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    verbs = parser.add_subparsers(dest="verb", required=True)

    run = verbs.add_parser("run", help="run (or resume) the pipeline described by CONFIG")
    run.add_argument("config", help="YAML config, e.g. configs/demo.yaml")
    run.add_argument("--run-dir", help="run folder (default: run.run_dir or runs/<name>; '-dry-run' added for dry runs)")
    run.add_argument("--stages", help="comma-separated stages to run, e.g. taxonomy,images (default: all)")
    run.add_argument("--dry-run", action="store_true",
                     help="offline: every LLM call goes to a local simulator; nothing is paid")
    run.add_argument("--no-progress", action="store_true", help="no live panel nor progress lines (logs only)")
    run.add_argument("--progress-interval", type=float, default=10.0, metavar="S",
                     help="seconds between progress lines when stderr is not a terminal (default 10)")
    run.add_argument("--engine", choices=["local", "ray"],
                     help="where shards run (default: run.engine): this process, or Ray workers (docs/scaling.md)")
    run.add_argument("--ray-address", help="with --engine ray: the cluster to join, e.g. auto (default: "
                     "run.ray_address, else a local Ray)")
    run.add_argument("--accept-unanswered", action="store_true",
                     help="keep rows a server could not answer (HTTP errors, timeouts after the retries) as failures "
                     "and finish the stage; by default the stage stops unfinished (exit 75) and the next run asks "
                     "them again")
    run.set_defaults(func=_cmd_run)

    status = verbs.add_parser("status", help="what each stage of a run folder has done")
    status.add_argument("run_dir")
    status.add_argument("--json", action="store_true", help="machine-readable output")
    status.add_argument("--watch", action="store_true", help="follow a running job live until it ends (Ctrl-C leaves)")
    status.add_argument("--once", action="store_true", help="the --watch view, one frame, then exit")
    status.add_argument("--interval", type=float, default=2.0, metavar="S", help="--watch: seconds between updates")
    status.set_defaults(func=_cmd_status)

    estimate = verbs.add_parser("estimate", help="project requests, tokens and $ of CONFIG before spending")
    estimate.add_argument("config")
    estimate.add_argument("--images", type=int, help="images to expect (default: the finished images stage's count)")
    estimate.add_argument("--kept-per-image", type=float, default=2.5, help="task types the filter keeps per image")
    estimate.add_argument("--filter-pass", type=float, default=0.85, help="share of images keeping >= 1 task type")
    estimate.add_argument("--from-run", metavar="RUN_DIR", help="project from a pilot run folder (finished or "
                          "partial) instead of the fixed assumptions")
    estimate.add_argument("--latency-s", type=float, help="with --from-run: seconds per request for the wall time "
                          "(default: 1 s + reply tokens / 50 tok/s)")
    estimate.set_defaults(func=_cmd_estimate)

    simulate = verbs.add_parser("simulate-api", help="serve the OpenAI-compatible simulator (tests, benchmarks)")
    from processors.simulator.thread import add_arguments

    add_arguments(simulate)
    simulate.set_defaults(func=_cmd_simulate)

    export = verbs.add_parser("export", help="write the final samples as a trainer reads them, with an image folder")
    export.add_argument("run_dir")
    export.add_argument("--format", choices=_export_formats(), help="the trainer's format (default: llava)")
    export.add_argument("--out", metavar="DIR", help="the folder to write the format's files and images/ into")
    export.add_argument("--llava", metavar="OUT.json", help="the LLaVA JSON under its own name (instead of --out)")
    export.add_argument("--image-root", help="LLaVA only: folder the JSON's image paths are relative to (default: images/ beside OUT.json)")
    export.add_argument("--copy-images", action="store_true", help="copy image files instead of symlinking them")
    export.set_defaults(func=_cmd_export)

    push = verbs.add_parser("push", help="publish every stage as a config of one Hub dataset repo")
    push.add_argument("run_dir")
    where = push.add_mutually_exclusive_group(required=True)
    where.add_argument("--repo-id", help="Hub dataset repo, e.g. me/taskgalaxy-demo (token: HF_TOKEN or `hf auth login`)")
    where.add_argument("--local-dir", help="write the identical repo layout to this folder instead (offline)")
    push.add_argument("--tag", help="tag the pushed commit, e.g. v1")
    push.add_argument("--private", action="store_true", help="create the repo as private")
    push.set_defaults(func=_cmd_push)

    from processors.quality.audit_sample import STRATIFY

    audit = verbs.add_parser("audit", help="check a sample by hand: draw it (--sample), then compute how many "
                             "kept answers are right and how each referee agrees with you (--labels)")
    audit.add_argument("run_dir")
    mode = audit.add_mutually_exclusive_group(required=True)
    mode.add_argument("--sample", type=int, metavar="N", help="draw N scored questions (kept and dropped) "
                      "and write the labelling page into --out")
    mode.add_argument("--labels", action="append", metavar="FILE", help="the labels the page downloaded; give "
                      "it twice (two people) for the agreement between them")
    audit.add_argument("--out", metavar="DIR", help="with --sample: the folder to write the page (index.html) into")
    audit.add_argument("--stratify", choices=STRATIFY,
                       help="with --sample: the strata within kept and dropped (default: category)")
    audit.add_argument("--seed", type=int, help="with --sample: the sample's seed (default 0)")
    audit.add_argument("--json", action="store_true", help="with --labels: the figures as JSON")
    audit.set_defaults(func=_cmd_audit)
    return parser


def main(argv: list[str] | None = None) -> int:
    from builder.config import ConfigError
    from builder.engine import StageStalledError
    from builder.runfolder import RunFolderError
    from builder.runlock import RunLockedError
    from processors.llm.errors import MissingApiKeyError

    args = build_parser().parse_args(argv)
    # Our packages log at INFO; libraries (open_clip logs on the root logger) only at WARNING unless -v.
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for name in ("taskgalaxy", "builder", "loaders", "processors"):
        logging.getLogger(name).setLevel(logging.DEBUG if args.verbose else logging.INFO)
    signal.signal(signal.SIGTERM, stop_on_sigterm)
    threads_before = set(threading.enumerate())
    try:
        return args.func(args)
    except (ConfigError, RunLockedError, MissingApiKeyError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except RunFolderError as exc:  # full disk, read-only or pseudo file system, damaged file: path, stage, fix
        logger.debug("traceback", exc_info=True)
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    except StageStalledError as exc:  # the stall watchdog stopped a stage: what stalled, how long, what to do
        print(f"error: {exc}", file=sys.stderr)
        return leaving(exc.exit_code, threads_before)  # the stalled shard's threads may never return
    except BrokenPipeError:  # `taskgalaxy status RUN | head`: the reader left; not an error of ours
        sys.stderr.close()
        return 0
    except KeyboardInterrupt as exc:  # Ctrl-C, or SIGTERM (Terminated)
        return stopped(exc, threads_before)
    except Exception as exc:  # noqa: BLE001 - the CLI's last line: one clear message, traceback with -v
        logger.debug("traceback", exc_info=True)
        cause = _spend_cap_of(exc)
        if cause is not None:  # a spend cap stopped the run: the cap, the spend, the next request, what to do
            print(f"error: {exc}", file=sys.stderr)
            return cause.exit_code
        print(f"error: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
