"""Time the store's commit and read of a real artifact on an S3 store against a local store, in one invocation.

The artifact is the download stage's (all of MNIST as data.npz, about 55 MB): a stage's own compute time is
left out, so the numbers are the store's cost. "read, cold" is another machine's first read (an empty local
cache: download and verify every file); "read, warm" a read with the copy already in the cache (re-hash it
against the bucket's manifest). Stores take turns (`--rounds`), each round with new keys.

    AWS_ENDPOINT_URL=... AWS_ACCESS_KEY_ID=... AWS_SECRET_ACCESS_KEY=... \\
        python bench/store.py s3://bucket/prefix [--rounds 3] [--out bench/store.md]
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import statistics
import tempfile
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

from tasks.config import load_config
from tasks.stages import download
from tasks.store.artifacts import Store, key_of


def timed(action: Callable[[], object]) -> float:
    started = time.perf_counter()
    action()
    return time.perf_counter() - started


def one_round(url: str, local_root: Path, source: Path, cache_root: Path) -> dict[str, dict[str, float]]:
    """Commit, cold read and warm read of the same artifact on each store, with keys new to this round."""
    def produce(out: Path) -> dict[str, str]:
        shutil.copy2(source / download.DATA_FILE, out / download.DATA_FILE)
        return {}

    times: dict[str, dict[str, float]] = {}
    for name, root in (("local", str(local_root)), ("s3", url)):
        key = key_of({"bench": uuid.uuid4().hex})
        os.environ["MNIST_AE_CACHE"] = str(cache_root / uuid.uuid4().hex)
        commit = timed(lambda: Store(root).materialize("download", key, {}, produce))  # noqa: B023
        os.environ["MNIST_AE_CACHE"] = str(cache_root / uuid.uuid4().hex)  # another machine
        reader = Store(root)
        cold = timed(lambda: reader.load("download", key))  # noqa: B023
        warm = timed(lambda: reader.load("download", key))  # noqa: B023
        times[name] = {"commit": commit, "read, cold": cold, "read, warm": warm}
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("url", help="an s3:// store root to write into (new keys under it each round)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-store-") as tmp:
        work = Path(tmp)
        source = work / "source"
        source.mkdir()
        download.run(load_config("quick").data, source)
        size_mb = (source / download.DATA_FILE).stat().st_size / 1e6
        rounds = [one_round(args.url, work / "local", source, work / "caches") for _ in range(args.rounds)]
    rows = [f"| {step} | {statistics.median(r['local'][step] for r in rounds):.2f} "
            f"| {statistics.median(r['s3'][step] for r in rounds):.2f} "
            f"| {statistics.median(r['s3'][step] / r['local'][step] for r in rounds):.1f}x |"
            for step in ("commit", "read, cold", "read, warm")]
    text = "\n".join([
        f"# Store cost: local directory against `{args.url.split('://')[0]}://` ({datetime.now(UTC):%Y-%m-%d})",
        "",
        f"{platform.machine()} {platform.system()}, {os.cpu_count()} cores; artifact: download ({size_mb:.0f} MB); "
        f"medians of {args.rounds} rounds, seconds; ratio = s3 / local within a round.",
        "",
        "| step | local s | s3 s | ratio |",
        "| --- | --- | --- | --- |",
        *rows,
        "",
    ])
    print(text)
    if args.out:
        args.out.write_text(text)


if __name__ == "__main__":
    main()
