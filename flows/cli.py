"""`mnist-ae`: run the pipeline, show what is cached, manage the champion model, classify images."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from tasks.config import PROFILES, STAGES, ConfigError, load_config, parse_overrides


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


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mnist-ae", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run the pipeline (cached stages come from the store)")
    _config_args(run)
    run.add_argument("--only", type=_stages, action="extend", default=[], metavar="STAGE[,STAGE]",
                     help="run only these stages; their upstream must be in the store")
    run.add_argument("--force", type=_stages, action="extend", default=[], metavar="STAGE[,STAGE]",
                     help="recompute these stages even when cached")
    status = sub.add_parser("status", help="each stage's key, and whether it is cached (and if not, why)")
    _config_args(status)
    return parser


def _run(args: argparse.Namespace) -> int:
    overrides = parse_overrides(args.overrides)
    load_config(args.profile, {**overrides, **({"store": args.store} if args.store else {})})  # fail before any work
    from flows.pipeline import pipeline

    result = pipeline(profile=args.profile, overrides=overrides, stages=args.only or None,
                      force=args.force or None, store=args.store)
    print(f"store: {result['store']}")
    for stage, ref in result["stages"].items():
        print(f"  {stage:<9} {'cached' if ref['cached'] else 'computed':<8} {ref['path']}")
    if result.get("report"):
        print(f"report: {result['report']}")
    return 0


def _status(args: argparse.Namespace) -> int:
    from tasks import graph
    from tasks.store import Store

    config = load_config(args.profile, {**parse_overrides(args.overrides), **({"store": args.store} if args.store else {})})
    store = Store(config.store)
    print(f"profile {config.profile}, store {store.root}")
    for step in graph.plan(config, store):
        state = "cached" if step.cached else f"not cached ({step.reason})"
        print(f"  {step.stage:<9} {step.key[:16]}  {state}")
    return 0


COMMANDS = {"run": _run, "status": _status}


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except ConfigError as exc:
        print(f"mnist-ae: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
