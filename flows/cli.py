"""`mnist-ae`: run the pipeline or the label study, show what is cached, take in labeled batches, manage the
champion, classify images, apply the project's automations to a Prefect server."""

from __future__ import annotations

import argparse
import gc
import getpass
import json
import logging
import os
import shutil
import sys
import tempfile
import uuid
from pathlib import Path
from typing import get_args

from flows.runners import DASK_ADDRESS_ENV, RUNNERS
from flows.server import ServerError, TemporaryServer
from flows.tf_logs import hide_tf_logs
from tasks.config import (
    PROFILES,
    STAGES,
    ConfigError,
    DatasetName,
    PipelineConfig,
    check_stages,
    check_study,
    load_config,
    parse_overrides,
)
from tasks.data.idx import DataError
from tasks.runs.registry import Registry, RegistryError
from tasks.runs.run_log import RunLogError
from tasks.store.artifacts import ArtifactError, Store, StoreError


def _user_errors() -> tuple[type[Exception], ...]:
    """Errors whose message tells the user what is wrong and where; anything else is a bug and keeps its traceback.

    The stage modules' errors count once their module is loaded: an error of a module never imported was never
    raised, and importing it here would load Keras and Great Expectations only to print one line.
    """
    errors: list[type[Exception]] = [RegistryError, DataError, FileNotFoundError, StoreError, ArtifactError,
                                      RunLogError, ServerError]
    for module, names in _STAGE_ERRORS.items():
        if loaded := sys.modules.get(module):
            errors += [getattr(loaded, name) for name in names]
    return tuple(errors)


_STAGE_ERRORS = {"tasks.pipeline.graph": ("MissingUpstream",), "tasks.ml.saved": ("ModelError",),
                 "tasks.ml.training": ("TrainingDiverged",),
                 "tasks.data.checks": ("ValidationFailed",), "flows.automations": ("AutomationsError",)}


class _BriefUserErrors(logging.Formatter):
    """Prefect's console format, without the traceback of a user error: the command ends with its one line, and
    Prefect's run log (the UI, `prefect flow-run logs`) keeps the traceback."""

    def __init__(self, inner: logging.Formatter) -> None:
        super().__init__()
        self.inner = inner

    def format(self, record: logging.LogRecord) -> str:
        if not (record.exc_info and isinstance(record.exc_info[1], _user_errors())):
            return self.inner.format(record)
        saved = record.exc_info, record.exc_text
        record.exc_info = record.exc_text = None
        try:
            return self.inner.format(record)
        finally:
            record.exc_info, record.exc_text = saved


def _brief_console() -> None:
    """Prefect's console handlers print user errors without their traceback (call once Prefect's logging is set up)."""
    from prefect.logging.configuration import ensure_logging_setup
    from prefect.logging.handlers import PrefectConsoleHandler

    ensure_logging_setup()
    for handler in logging.getLogger().handlers:
        if isinstance(handler, PrefectConsoleHandler) and not isinstance(handler.formatter, _BriefUserErrors):
            handler.setFormatter(_BriefUserErrors(handler.formatter or logging.Formatter()))


def _config_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--profile", default="default", help=f"one of {', '.join(PROFILES)}")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config field, e.g. finetune.learning_rate=0.1 (repeatable)")
    parser.add_argument("--store", help="store root (default: artifacts/, or $MNIST_AE_STORE)")


def _stages(text: str) -> list[str]:
    names = [s.strip() for s in text.split(",") if s.strip()]
    if bad := [s for s in names if s not in STAGES]:
        raise argparse.ArgumentTypeError(f"unknown stage {', '.join(bad)}; stages are {', '.join(STAGES)}")
    return names


def _runner_args(parser: argparse.ArgumentParser, what: str) -> None:
    parser.add_argument("--runner", choices=RUNNERS, default="sequential",
                        help=f"sequential (default): one at a time in this process; "
                             f"dask: independent {what} side by side on a Dask cluster")
    parser.add_argument("--dask-address", metavar="tcp://HOST:PORT",
                        help=f"an existing Dask scheduler (default: ${DASK_ADDRESS_ENV}, else a local cluster)")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mnist-ae", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run the pipeline (cached stages come from the store)")
    _config_args(run)
    run.add_argument("--only", type=_stages, action="extend", default=[], metavar="STAGE[,STAGE]",
                     help="run only these stages; their upstream must be in the store")
    run.add_argument("--force", type=_stages, action="extend", default=[], metavar="STAGE[,STAGE]",
                     help="recompute these stages even when cached")
    _runner_args(run, "stages")
    study = sub.add_parser("study", help="label-efficiency study: each model on each label budget and seed")
    _config_args(study)
    _runner_args(study, "cells")
    status = sub.add_parser("status", help="each stage's key, and whether it is cached (and if not, why)")
    _config_args(status)
    promote = sub.add_parser("promote", help="make an evaluated model the champion by hand")
    promote.add_argument("key", help="the fine-tune artifact key of the model (a unique prefix is enough)")
    promote.add_argument("--reason", default="promoted by hand")
    promote.add_argument("--store")
    promote.add_argument("--dataset", default="mnist", choices=get_args(DatasetName))
    rollback = sub.add_parser("rollback", help="make the previous champion the champion again")
    rollback.add_argument("--store")
    rollback.add_argument("--dataset", default="mnist", choices=get_args(DatasetName))
    data = sub.add_parser("data", help="labeled batches arriving in the incoming directory (data.incoming)")
    data_sub = data.add_subparsers(dest="data_command", required=True)
    add = data_sub.add_parser("add", help="copy batches into the incoming directory and validate them now: "
                                          "would the next run accept them?")
    add.add_argument("paths", nargs="+", type=Path, metavar="PATH",
                     help="a .npz with x and y, or a directory with an IDX image/label pair or class folders 0..9")
    _config_args(add)
    listed = data_sub.add_parser("list", help="every batch: accepted, pending or quarantined, with counts")
    _config_args(listed)
    automations = sub.add_parser("automations", help="the project's Prefect automations (alerts) on a lasting server")
    automations_sub = automations.add_subparsers(dest="automations_command", required=True)
    apply = automations_sub.add_parser("apply", help="replace this project's automations on the server "
                                                     "PREFECT_API_URL names with those of the file")
    apply.add_argument("--file", type=Path, default=None, metavar="YAML", help="default: automations.yaml")
    predict = sub.add_parser("predict", help="classify digit images (PNG/JPEG) with the champion model")
    predict.add_argument("images", nargs="+", type=Path)
    predict.add_argument("--json", action="store_true", help="machine-readable output")
    predict.add_argument("--store")
    predict.add_argument("--dataset", default="mnist", choices=get_args(DatasetName))
    return parser


def _config(args: argparse.Namespace) -> PipelineConfig:
    return load_config(args.profile, parse_overrides(args.overrides), args.store)


def _registry(args: argparse.Namespace, write: bool = False) -> Registry:
    store = Store(load_config(store=args.store).store)
    if write:
        store.check_writable()
    else:
        store.check_readable()
    return Registry(store.url, args.dataset)


def _run(args: argparse.Namespace) -> int:
    config = _config(args)
    check_stages(config, args.only, args.force)  # fail on a bad value before any work
    if config.stages != STAGES:  # all stages always have what they read; checking a subset loads the stage code
        from tasks.pipeline.graph import check_config

        check_config(config)
    Store(config.store).check_writable()  # before Prefect starts its server
    Registry(config.store, config.data.dataset).champion()  # an unreadable registry would fail only after training
    server = TemporaryServer().start()
    _brief_console()
    from flows.pipeline import pipeline

    with server.api():
        result = pipeline(profile=args.profile, overrides=parse_overrides(args.overrides), stages=args.only or None,
                          force=args.force or None, store=args.store, runner=args.runner,
                          dask_address=args.dask_address)
    print(f"store: {result['store']}")
    for verdict in (result.get("batches") or {}).get("verdicts", []):
        outcome = "accepted" if verdict["accepted"] else f"quarantined in {verdict['where']}: " + \
            "; ".join(verdict["failures"])
        print(f"  batch {verdict['name']} ({verdict['images']} images) {outcome}")
    for stage, ref in result["stages"].items():
        print(f"  {stage:<9} {'cached' if ref['cached'] else 'computed':<8} {ref['path']}")
    if result.get("report"):
        print(f"report: {result['report']}")
    return 0


def _study(args: argparse.Namespace) -> int:
    config = _config(args)
    check_study(config)  # fail on a bad value before any work
    Store(config.store).check_writable()  # before Prefect starts its server
    server = TemporaryServer().start()
    _brief_console()
    from flows.study import label_study

    with server.api():
        result = label_study(profile=args.profile, overrides=parse_overrides(args.overrides), store=args.store,
                             runner=args.runner, dask_address=args.dask_address)
    computed = sum(not c["cached"] for c in result["cells"])
    print(f"store: {result['store']}")
    print(f"cells: {len(result['cells'])} ({computed} computed, {len(result['cells']) - computed} from the store)")
    for sentence in result["verdicts"]:
        print(f"  {sentence}")
    print(f"report: {result['report']}")
    return 0


def _status(args: argparse.Namespace) -> int:
    from tasks.data import intake
    from tasks.pipeline import graph

    config = _config(args)
    store = Store(config.store)
    store.check_readable()
    print(f"profile {config.profile}, store {store.url}")
    if config.data.incoming:
        batches = intake.look(config.data, store)
        config = batches.apply(config)
        print(f"  incoming {config.data.incoming}: {len(batches.accepted)} accepted batch(es), {batches.pending} new "
              "(the next run validates them)")
    for step in graph.plan(config, store):
        state = "cached" if step.cached else f"not cached ({step.reason})"
        print(f"  {step.stage:<9} {step.key[:16]}  {state}")
    return 0


def _who() -> str:
    return f"cli:{getpass.getuser()}"


def _promote(args: argparse.Namespace) -> int:
    from tasks.runs.promotion import stored_candidates

    registry = _registry(args, write=True)
    # Models evaluated in the store but never judged (their run failed while publishing) count too.
    candidates = {**stored_candidates(registry.store, args.dataset), **registry.candidates()}
    known = ", ".join(k[:12] for k in candidates) or "none"
    if not args.key.strip():  # every key starts with ""
        raise RegistryError(f"the key is empty; give an evaluated model's key or a prefix of it (known: {known})")
    matches = [key for key in candidates if key.startswith(args.key)]
    if len(matches) != 1:
        raise RegistryError(f"{args.key!r} matches {len(matches)} evaluated models (known: {known})")
    if registry.promote(matches[0], candidates[matches[0]], by=_who(), reason=args.reason) is None:
        print(f"champion: {matches[0]} (already the champion; nothing recorded)")
    else:
        print(f"champion: {matches[0]}")
    return 0


def _rollback(args: argparse.Namespace) -> int:
    champion = _registry(args, write=True).rollback(by=_who())
    print(f"champion: {champion['key']} (promoted {champion['promoted_at']})")
    return 0


def _predict(args: argparse.Namespace) -> int:
    from tasks.serve.predict import predict

    registry = _registry(args)
    model = registry.champion_model()  # verified against its artifact's manifest
    if model is None:
        raise RegistryError(f"no {args.dataset} champion in {registry.store.url}: run the pipeline first")
    results = predict(model, args.images)
    if args.json:
        # Probabilities are finite (predict refuses a model that outputs NaN), so strict JSON cannot fail here.
        print(json.dumps([{"path": str(r.path), "digit": r.digit, "probability": r.probability, "error": r.error}
                          for r in results], indent=2, allow_nan=False))
    else:
        for r in results:
            if r.error:
                print(f"{r.path}: error: {r.error}", file=sys.stderr)
            else:
                print(f"{r.path}: {r.digit} (p={r.probability:.3f})")
    return 1 if any(r.error for r in results) else 0


def _incoming(config: PipelineConfig) -> Path:
    if config.data.incoming is None:
        raise ConfigError("data.incoming: no incoming directory is configured; set MNIST_AE_INCOMING or "
                          "--set data.incoming=DIR")
    return config.data.incoming


def _data(args: argparse.Namespace) -> int:
    return _data_add(args) if args.data_command == "add" else _data_list(args)


def _data_add(args: argparse.Namespace) -> int:
    from tasks.data.batches import check_name, read_batch
    from tasks.data.intake import check

    config = _config(args)
    incoming = _incoming(config)
    store = Store(config.store)
    store.check_readable()
    incoming.mkdir(parents=True, exist_ok=True)
    refused = 0
    for path in args.paths:
        check_name(path)
        target = incoming / path.name
        if target.exists():
            raise DataError(f"{target}: a batch of that name is already in the incoming directory; rename {path}")
        batch = read_batch(path)  # strictly, before anything is copied
        # Copied under a hidden name and renamed, so a run never sees half a batch.
        staging = incoming / f".{path.name}.{uuid.uuid4().hex[:8]}"
        if path.is_dir():
            shutil.copytree(path, staging)
        else:
            shutil.copyfile(path, staging)
        os.replace(staging, target)
        with tempfile.TemporaryDirectory(prefix="mnist-ae-check-") as docs:
            verdict = check(config, store, batch, Path(docs))
        if verdict.accepted:
            print(f"{target}: {verdict.images} images, sha256 {batch.sha256[:12]}; the next run accepts it")
        else:
            refused += 1
            print(f"{target}: {verdict.images} images, sha256 {batch.sha256[:12]}; the next run quarantines it:\n"
                  + "\n".join(f"  - {line}" for line in verdict.failures))
    return 1 if refused else 0


def _data_list(args: argparse.Namespace) -> int:
    from tasks.data.intake import listing

    config = _config(args)
    incoming = _incoming(config)
    store = Store(config.store)
    store.check_readable()
    rows = listing(config.data, store)
    print(f"incoming {incoming}: {len(rows)} batch(es)")
    for row in rows:
        images = "?" if row["images"] is None else f"{row['images']:,}"
        print(f"  {row['batch']:<24} {row['status']:<11} {images:>7} images  {row['sha256'] or '-':<12}  {row['why']}")
    return 0


def _automations(args: argparse.Namespace) -> int:
    from flows.automations import FILE, apply

    url, created, removed = apply(args.file or FILE)
    print(f"{len(created)} automation(s) applied to {url} ({removed} earlier cop{'y' if removed == 1 else 'ies'} "
          "removed):")
    for name, automation_id in created:
        print(f"  {name}  {automation_id}")
    return 0


COMMANDS = {"run": _run, "study": _study, "status": _status, "data": _data, "promote": _promote, "rollback": _rollback,
            "predict": _predict, "automations": _automations}


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except ConfigError as exc:
        print(f"mnist-ae: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # Ctrl-C: 130 as for a shell's command ended by SIGINT
        # The store publishes an artifact only once it is complete (tasks/store/artifacts.py), so an interrupted
        # stage left none.
        kept = "; finished stages stay in the store, unfinished ones were not stored" \
            if args.command in ("run", "study") else ""
        print(f"mnist-ae: interrupted{kept}", file=sys.stderr)
        return 130
    except Exception as exc:
        if not isinstance(exc, _user_errors()):
            raise
        print(f"mnist-ae: {exc}", file=sys.stderr)
        for note in getattr(exc, "__notes__", []):
            print(f"mnist-ae: {note}", file=sys.stderr)
        return 1


def entry() -> None:
    """The `mnist-ae` command: `main`, then the process ends."""
    hide_tf_logs()  # before any command imports TensorFlow
    code = main()
    # The process ends next. Without this, Python's shutdown runs full garbage collections over every TensorFlow,
    # Keras and Prefect object first, for memory the process returns anyway (docs/measurements.md).
    gc.freeze()
    sys.exit(code)


if __name__ == "__main__":
    entry()
