"""Seconds per pretraining epoch of the seed network: the pipeline's stage against a bare `keras.Model.fit`.

One invocation, each variant in a fresh process (Keras seeding and TensorFlow's op determinism are process-wide),
on the 55,000 training images at batch 256, as the `seed` profile pretrains:

- `pipeline`: `tasks.stages.pretrain.run`, exactly as the stage runs (its input pipeline, callbacks, training log);
- `bare`: `keras.Model.fit` of the same network, optimizer, compile settings (32 steps per call, no XLA, op
  determinism on) and validation data, fed by the textbook `tf.data` pipeline (shuffle, batch, prefetch);
- `xla`: `bare` compiled with XLA (op determinism off, since Keras turns XLA off under it);
- `previous`: the stage before this benchmark (the arrays handed to Keras, one step per call, op determinism on,
  no XLA);
- `torch`, `torch-compiled` (only when PyTorch is installed, e.g. `pip install torch`): the same network, loss,
  optimizer arithmetic (RMSProp, decay 0.9), batches and validation pass as a plain PyTorch loop, eagerly and with
  `torch.compile`. The issue's yardstick for the epoch was the compiled PyTorch loop on its machine; these rows
  give it on the machine at hand.

The epoch time is the median over epochs 2..N; epoch 1 also pays for tracing (and XLA's compilation) and is
reported apart. The table's heading also says how fast this machine multiplies matrices (machines of one kind
differ: compare seconds only within one table).

    python bench/speed.py [--epochs 6] [--out bench/speed.md]
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
VARIANTS = ("previous", "bare", "pipeline", "xla")
TORCH_VARIANTS = ("torch", "torch-compiled")


def machine() -> str:
    return f"{platform.machine()}, {os.cpu_count()} cores, {platform.system()} (Python {platform.python_version()})"


# One pretraining epoch of the seed network, GFLOP: 55,000 images x 2 per multiply-add x 3 matmuls per weight
# (forward, two backward) x its 217,088 weights (784-128-64 and the mirrored decoder).
EPOCH_GFLOP = 55_000 * 2 * 3 * 2 * (784 * 128 + 128 * 64) / 1e9


def arithmetic() -> dict[str, float]:
    """TensorFlow's float32 matmul throughput here, GFLOP/s: large square matrices and this network's first layer."""
    import tensorflow as tf

    found = {}
    for name, (m, k, n), repeats in (("large", (4096, 4096, 4096), 5), ("layer", (256, 784, 128), 2000)):
        a, b = tf.random.normal((m, k)), tf.random.normal((k, n))
        tf.linalg.matmul(a, b).numpy()
        best = math.inf
        for _ in range(3):
            started = time.perf_counter()
            for _ in range(repeats):
                c = tf.linalg.matmul(a, b)
            c.numpy()
            best = min(best, time.perf_counter() - started)
        found[name] = repeats * 2 * m * k * n / best / 1e9
    return found


def cpu_vectors() -> str:
    """The widest SIMD extension the CPU reports (Linux)."""
    flags = Path("/proc/cpuinfo").read_text().split() if Path("/proc/cpuinfo").exists() else []
    return next((f.upper() for f in ("avx512f", "avx2", "avx") if f in flags), "unknown")


def has_torch() -> bool:
    import importlib.util

    return importlib.util.find_spec("torch") is not None


def measure_torch(compiled: bool, epochs: int, data_dir: Path) -> list[float]:
    """The seed pretraining as a plain PyTorch loop: same shapes, sigmoid layers, mean squared error, RMSProp."""
    import torch

    from tasks.config import load_config
    from tasks.data.splits import load_splits

    config = load_config("seed")
    data = load_splits(data_dir, config.data.split())
    torch.manual_seed(config.seed)
    widths = [784, *config.pretrain.hidden, *reversed(config.pretrain.hidden[:-1]), 784]
    layers: list[torch.nn.Module] = []
    for fan_in, fan_out in itertools.pairwise(widths):
        layers += [torch.nn.Linear(fan_in, fan_out), torch.nn.Sigmoid()]
    model = torch.nn.Sequential(*layers)
    optimizer = torch.optim.RMSprop(model.parameters(), lr=config.pretrain.learning_rate, alpha=0.9)
    loss_fn = torch.nn.MSELoss()

    def step(batch: torch.Tensor) -> torch.Tensor:
        optimizer.zero_grad(set_to_none=True)
        loss = loss_fn(model(batch), batch)
        loss.backward()
        optimizer.step()
        return loss

    def validate(images: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return loss_fn(model(images), images)

    if compiled:
        step, validate = torch.compile(step), torch.compile(validate)
    x, x_val = torch.from_numpy(data.x_train), torch.from_numpy(data.x_val)
    size = config.pretrain.batch_size
    seconds = []
    for _ in range(epochs):
        started = time.perf_counter()
        order = torch.randperm(len(x))
        whole = len(x) // size * size  # full batches only, so the compiled step keeps one shape
        for begin in range(0, whole, size):
            step(x[order[begin:begin + size]])
        for begin in range(0, len(x_val), 2048):  # the held-out loss after every epoch, as the stage logs it
            validate(x_val[begin:begin + 2048])
        seconds.append(time.perf_counter() - started)
    return seconds


def measure(variant: str, epochs: int, data_dir: Path) -> dict[str, float]:
    """Train in this process and return the epoch seconds; called in a child process per variant."""
    if variant in TORCH_VARIANTS:
        seconds = measure_torch(variant == "torch-compiled", epochs, data_dir)
        return {"first_epoch_s": seconds[0], "epoch_s": statistics.median(seconds[1:])}
    import keras
    import tensorflow as tf

    from tasks.config import load_config
    from tasks.data.splits import load_splits
    from tasks.ml import networks, optimizers, training
    from tasks.stages import pretrain
    from tasks.stages.files import TRAINING_LOG_FILE

    config = load_config("seed", {"pretrain.epochs": epochs})
    if variant == "pipeline":
        with tempfile.TemporaryDirectory() as out:
            pretrain.run(config.pretrain, config.data.split(), data_dir, Path(out), seed=config.seed)
            seconds = [row["seconds"] for row in json.loads((Path(out) / TRAINING_LOG_FILE).read_text())]
    else:
        keras.utils.set_random_seed(config.seed)
        data = load_splits(data_dir, config.data.split())
        model = networks.build_autoencoder(config.pretrain, config.seed)
        if variant != "xla":
            tf.config.experimental.enable_op_determinism()
        settings = dict(jit_compile=variant == "xla",
                        steps_per_execution=1 if variant == "previous" else training.STEPS_PER_EXECUTION)
        model.compile(optimizer=optimizers.make_optimizer("rmsprop_tf1", config.pretrain.learning_rate),
                      loss=training.RECONSTRUCTION_LOSS, **settings)
        seconds = []

        class Timer(keras.callbacks.Callback):
            def on_epoch_begin(self, epoch, logs=None):
                self.started = time.perf_counter()

            def on_epoch_end(self, epoch, logs=None):
                seconds.append(time.perf_counter() - self.started)

        if variant == "previous":  # as the stage fed Keras before: the arrays, shuffled by Keras
            inputs: dict = dict(x=data.x_train, y=data.x_train, batch_size=config.pretrain.batch_size, shuffle=True)
        else:  # the textbook tf.data pipeline: shuffle, batch, prefetch
            inputs = dict(x=tf.data.Dataset.from_tensor_slices((data.x_train, data.x_train))
                          .shuffle(len(data.x_train), seed=config.seed).batch(config.pretrain.batch_size)
                          .prefetch(tf.data.AUTOTUNE))
        # The same work as the stage: the held-out images' loss after every epoch, for its training log.
        model.fit(**inputs, epochs=epochs, validation_data=(data.x_val, data.x_val),
                  validation_batch_size=training.EVALUATION_BATCH, callbacks=[Timer()], verbose=0)
    return {"first_epoch_s": seconds[0], "epoch_s": statistics.median(seconds[1:])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--rounds", type=int, default=2, help="each variant this many times, interleaved")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "speed.md")
    parser.add_argument("--child", nargs=2, metavar=("VARIANT", "DATA_DIR"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child = arithmetic() if args.child[0] == "arithmetic" else measure(args.child[0], args.epochs,
                                                                             Path(args.child[1]))
        print(json.dumps(child))
        return

    from tasks.config import load_config
    from tasks.stages import download

    variants = VARIANTS + (TORCH_VARIANTS if has_torch() else ())
    results: dict[str, list[dict[str, float]]] = {v: [] for v in variants}
    with tempfile.TemporaryDirectory() as data_dir:
        download.run(load_config("seed").data, Path(data_dir))
        for _ in range(args.rounds):
            for variant in variants:
                out = subprocess.run([sys.executable, __file__, "--epochs", str(args.epochs), "--child", variant,
                                      data_dir], check=True, capture_output=True, text=True, cwd=ROOT).stdout
                results[variant].append(json.loads(out.strip().splitlines()[-1]))
                print(variant, results[variant][-1], flush=True)

    out = subprocess.run([sys.executable, __file__, "--child", "arithmetic", "-"], check=True, capture_output=True,
                         text=True, cwd=ROOT).stdout
    flops = json.loads(out.strip().splitlines()[-1])
    best = {v: min(r["epoch_s"] for r in runs) for v, runs in results.items()}
    lines = [f"# Pretraining epoch of the seed network ({datetime.now(UTC):%Y-%m-%d}, {machine()})", "",
             f"This machine's CPU ({cpu_vectors()}) multiplies float32 matrices in TensorFlow at {flops['large']:.0f} "
             f"GFLOP/s (4096 x 4096) and {flops['layer']:.0f} GFLOP/s (256 x 784 by 784 x 128, the first layer); "
             f"an epoch is {EPOCH_GFLOP:.0f} GFLOP, so {EPOCH_GFLOP / flops['layer']:.2f} s at the layer's rate.", "",
             f"55,000 images, batch 256, TF1 RMSProp; median of epochs 2-{args.epochs}, best of {args.rounds} "
             "interleaved rounds; epoch 1 includes tracing and compilation.", "",
             "| variant | s/epoch | epoch 1 s | vs bare fit |", "|---|---|---|---|"]
    for variant, runs in results.items():
        first = min(r["first_epoch_s"] for r in runs)
        lines.append(f"| {variant} | {best[variant]:.3f} | {first:.2f} | {best[variant] / best['bare']:.2f}x |")
    args.out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
