"""Hostile batches through `mnist-ae data add` and `mnist-ae run`: refused in one line, quarantined once, never
blocking the others; PNG scans of real digits accepted."""

from __future__ import annotations

import gzip
import json
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFilter

from flows.cli import main as cli
from flows.tf_logs import LOG_LINE
from tasks.data.batches import read_batch
from tasks.data.idx import encode_idx

CLAIMED = 2**31  # images a bomb's header declares
UNPACKED_MB = 2100  # zeros after its header: a 2 MB file that unpacks to 2.1 GB


@pytest.fixture
def incoming(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("MNIST_AE_INCOMING", str(tmp_path / "incoming"))
    return tmp_path / "incoming"


def store_args(tmp_path: Path) -> list[str]:
    return ["--store", str(tmp_path / "store")]


def idx_pair(folder: Path, x: np.ndarray, y: np.ndarray) -> Path:
    folder.mkdir(parents=True)
    (folder / "images-idx3-ubyte.gz").write_bytes(gzip.compress(encode_idx(x)))
    (folder / "labels-idx1-ubyte").write_bytes(encode_idx(y))
    return folder


def gzip_bomb(folder: Path, images: int) -> Path:
    """An IDX pair whose image file's header declares `images` images, then 2.1 GB of zeros (gzip members in a row)."""
    folder.mkdir(parents=True)
    header = encode_idx(np.zeros((0, 28, 28), np.uint8))[:4] + np.asarray([images, 28, 28], ">u4").tobytes()
    zeros = gzip.compress(bytes(1 << 20), compresslevel=9)  # one MB of zeros, packed once and repeated
    with (folder / "images-idx3-ubyte.gz").open("wb") as out:
        out.write(gzip.compress(header))
        for _ in range(UNPACKED_MB):
            out.write(zeros)
    (folder / "labels-idx1-ubyte").write_bytes(encode_idx(np.zeros(10, np.uint8)))
    return folder


def png_folders(folder: Path, x: np.ndarray, y: np.ndarray, side: int, resample: Image.Resampling,
                pen: int = 1) -> Path:
    """Class folders of digits saved as a team's scans are: dark ink on white, larger; `pen` > 1 draws them bolder."""
    for i, (image, label) in enumerate(zip(x, y, strict=True)):
        (folder / str(label)).mkdir(parents=True, exist_ok=True)
        scan = Image.fromarray(255 - image).resize((side, side), resample)
        scan.filter(ImageFilter.MinFilter(pen)).save(folder / str(label) / f"{i}.png")
    return folder


def empty_batches(root: Path) -> list[Path]:
    np.savez(root / "empty.npz", x=np.zeros((0, 28, 28), np.uint8), y=np.zeros(0, np.uint8))
    return [root / "empty.npz", idx_pair(root / "empty-idx", np.zeros((0, 28, 28), np.uint8), np.zeros(0, np.uint8))]


def test_data_add_refuses_an_empty_batch_and_copies_nothing(tmp_path, incoming, capsys):
    for batch in empty_batches(tmp_path):
        assert cli(["data", "add", str(batch), *store_args(tmp_path)]) == 1
        err = capsys.readouterr().err
        assert err == f"mnist-ae: {batch}: holds no images; a batch needs at least one\n"
        assert list(incoming.iterdir()) == []


@pytest.mark.parametrize("name", [".week.npz", "_week.npz", "_quarantine"])
def test_data_add_refuses_a_name_runs_would_skip(mnist, tmp_path, incoming, capsys, name):
    batch = tmp_path / name
    np.savez(batch, x=mnist.x_train[:30], y=mnist.y_train[:30])
    assert cli(["data", "add", str(batch), *store_args(tmp_path)]) == 1
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err == (f"mnist-ae: {batch}: names starting with '.' or '_' are hidden (staging copies, the "
                            "quarantine) and runs skip them; rename it\n")
    assert list(incoming.iterdir()) == []


def npz_bomb(path: Path, images: int) -> Path:
    """A .npz whose x holds `images` blank images, written in pieces: a few MB that unpack to `images` x 784 bytes."""
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED, compresslevel=1) as archive:
        with archive.open("x.npy", "w", force_zip64=True) as x:
            np.lib.format.write_array_header_1_0(x, {"descr": "|u1", "fortran_order": False,
                                                     "shape": (images, 28, 28)})
            for _ in range(images * 784 >> 20):
                x.write(bytes(1 << 20))
            x.write(bytes(images * 784 % (1 << 20)))
        with archive.open("y.npy", "w") as y:
            np.lib.format.write_array(y, np.zeros(images, np.uint8))
    return path


@pytest.mark.parametrize(("make", "problem"), [
    (lambda d: gzip_bomb(d / "bomb", CLAIMED) / "images-idx3-ubyte.gz",
     f"header declares {CLAIMED:,} items, more than the 250,000 accepted; split it into smaller files"),
    (lambda d: gzip_bomb(d / "bomb", 10) / "images-idx3-ubyte.gz",
     "more than 1048576 trailing bytes after the 7840 data bytes the header declares"),
    (lambda d: npz_bomb(d / "bomb.npz", 1_000_000),
     "x declares 1,000,000 rows, more than the 250,000 images a batch may hold; split it"),
], ids=["idx-huge-header", "idx-more-than-declared", "npz-compressed"])
def test_data_add_refuses_a_bomb_without_unpacking_it(tmp_path, incoming, make, problem):
    named = make(tmp_path)
    bomb = named if named.suffix == ".npz" else named.parent
    assert named.stat().st_size < 8 << 20
    # A fresh process (a child's ru_maxrss counts this test process's memory too). The modules the command imports
    # are loaded before its peak resident memory is taken, so the growth is what reading the bomb cost.
    code = ("import re, sys; from flows.cli import _user_errors, main; import tasks.data.intake; _user_errors(); "
            "peak = lambda: int(re.search(r'VmHWM:\\s*(\\d+) kB', open('/proc/self/status').read())[1]); "
            "before = peak(); code = main(sys.argv[1:]); print(peak() - before); sys.exit(code)")
    done = subprocess.run([sys.executable, "-c", code, "data", "add", str(bomb), *store_args(tmp_path)],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 1
    # Besides TensorFlow's log records (oneDNN's notice, on CPUs where it is on), the command's one line.
    assert [line for line in done.stderr.splitlines() if not LOG_LINE.match(line.encode())] == [
        f"mnist-ae: {named}: {problem}"], done.stderr
    assert int(done.stdout) < 256 << 10  # KiB: far below the 0.8-2.1 GB the bombs unpack to
    assert list(incoming.iterdir()) == []


@pytest.mark.usefixtures("mirror_env")
def test_png_scans_of_real_digits_are_accepted_and_a_bolder_pen_is_not(mnist, tmp_path, incoming, capsys):
    """Real digits as larger dark-on-light PNGs convert to MNIST's ink statistics; drawn bolder, they drift."""
    from scipy.stats import ks_2samp

    x, y = mnist.x_train[57000:57300], mnist.y_train[57000:57300]
    ink = (mnist.x_train > 0).sum(axis=(1, 2))
    for side, resample in ((112, Image.Resampling.NEAREST), (200, Image.Resampling.LANCZOS)):
        scans = png_folders(tmp_path / f"scans-{side}", x, y, side, resample)
        converted = read_batch(scans).x
        assert ks_2samp((converted > 0).sum(axis=(1, 2)), ink).statistic < 0.25  # 0.38-0.49 before the fix
        assert cli(["data", "add", str(scans), *store_args(tmp_path)]) == 0
        out = capsys.readouterr().out
        assert out.startswith(f"{incoming / scans.name}: 300 images")
        assert out.strip().endswith("the next run accepts it")
    bold = png_folders(tmp_path / "bold", x, y, 112, Image.Resampling.NEAREST, pen=9)
    assert cli(["data", "add", str(bold), *store_args(tmp_path)]) == 1
    out = capsys.readouterr().out
    assert "the next run quarantines it" in out and "- ink per image distributed as in the accepted data" in out


@pytest.mark.usefixtures("prefect_api", "mirror_env")
def test_a_run_quarantines_bad_batches_once_and_judges_the_others(mnist, tmp_path, incoming, capsys):
    incoming.mkdir()
    empty_batches(incoming)  # dropped by hand, as a copy into the directory would
    gzip_bomb(incoming / "bomb", CLAIMED)
    np.savez(incoming / "clean.npz", x=np.roll(mnist.x_train[56000:56300], (1, 1), axis=(1, 2)),
             y=mnist.y_train[56000:56300])
    args = ["run", "--profile", "quick", "--only", "download", *store_args(tmp_path)]
    assert cli(args) == 0
    lines = [line.strip() for line in capsys.readouterr().out.splitlines() if line.strip().startswith("batch ")]
    assert len(lines) == 4 and lines[1] == "batch clean.npz (300 images) accepted"
    quarantined = {line.split()[1]: line for line in lines if " quarantined in " in line}
    assert quarantined["bomb"].endswith(f"header declares {CLAIMED:,} items, more than the 250,000 accepted; "
                                        "split it into smaller files")
    for name in ("empty.npz", "empty-idx"):
        assert quarantined[name].endswith(f"{incoming / name}: holds no images; a batch needs at least one")
    assert sorted(p.name for p in incoming.iterdir()) == ["_quarantine", "clean.npz"]
    moved = sorted((incoming / "_quarantine").glob("*/verdict.json"))
    assert sorted(json.loads(p.read_text())["name"] for p in moved) == ["bomb", "empty-idx", "empty.npz"]

    assert cli(args) == 0  # nothing new: nothing judged again
    assert " batch " not in capsys.readouterr().out
    assert sorted((incoming / "_quarantine").glob("*/verdict.json")) == moved
