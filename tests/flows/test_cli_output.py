"""The command line's stderr holds its own words only: TensorFlow's log lines are filtered out unless asked for."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import textwrap
import uuid
from pathlib import Path

import numpy as np
import pytest

from flows.tf_logs import LOG_LINE

ROOT = Path(__file__).resolve().parents[2]
MNIST_AE = Path(sys.executable).with_name("mnist-ae")  # the console script, as the user runs it


@pytest.fixture
def user_env(tmp_path, mnist_mirror) -> dict[str, str]:
    """A user's shell on a CPU where TensorFlow's oneDNN custom ops are on, which logs at library load."""
    env = {**os.environ, "TF_ENABLE_ONEDNN_OPTS": "1", "MNIST_MIRROR": str(mnist_mirror), "MNIST_AE_OFFLINE": "1",
           "PREFECT_HOME": str(tmp_path / "prefect-home"), "MNIST_AE_STORE": str(tmp_path / "store"),
           "MNIST_AE_INCOMING": str(tmp_path / "incoming")}
    # This process imported `flows`, which sets a default level; the user set none.
    for name in ("TF_CPP_MIN_LOG_LEVEL", "PREFECT_API_URL", "PREFECT__FLOW_RUN_ID"):
        env.pop(name, None)
    return env


def mnist_ae(env: dict[str, str], *args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(MNIST_AE), *args], env=env, cwd=cwd, capture_output=True, text=True, timeout=300)


def own_lines(err: str) -> list[str]:
    """stderr's lines, checked to hold no log record and no traceback."""
    lines = err.splitlines()
    assert "Traceback" not in err and not [line for line in lines if LOG_LINE.match(line.encode())], err
    return lines


def test_commands_print_only_their_own_words_on_stderr(user_env, tmp_path):
    bad_config = mnist_ae(user_env, "run", "--profile", "quick", "--set", "pretrain.epochs=-1", cwd=tmp_path)
    assert bad_config.returncode == 2 and bad_config.stdout == ""
    first, *rest = own_lines(bad_config.stderr)  # the message, and any indented lines that continue it
    assert first.startswith("mnist-ae: ") and all(line.startswith("  ") for line in rest), bad_config.stderr
    assert "pretrain.epochs" in bad_config.stderr

    # Imports TensorFlow, which logs at load on such a CPU; `python -m flows.cli` is the same command.
    status = subprocess.run([sys.executable, "-m", "flows.cli", "status"], env=user_env, cwd=tmp_path,
                            capture_output=True, text=True, timeout=300)
    assert status.returncode == 0 and "not cached (never computed)" in status.stdout
    assert own_lines(status.stderr) == []

    (tmp_path / "bad.png").write_text("not an image")
    predict = mnist_ae(user_env, "predict", "bad.png", cwd=tmp_path)
    assert predict.returncode == 1 and predict.stdout == ""
    (line,) = own_lines(predict.stderr)
    assert line.startswith("mnist-ae: ") and "champion" in line  # none yet

    np.savez(tmp_path / "tens.npz", x=np.zeros((5, 28, 28), np.uint8), y=np.full(5, 10, np.uint8))
    data_add = mnist_ae(user_env, "data", "add", "tens.npz", cwd=tmp_path)
    assert data_add.returncode == 1 and "labels in 0..9" in data_add.stdout and "the next run quarantines it" in \
        data_add.stdout
    assert own_lines(data_add.stderr) == []


def test_a_user_error_inside_the_flow_is_one_line_without_prefects_traceback(user_env, tmp_path):
    """Prefect logs a failed flow's exception with its traceback; for the product's own errors the terminal gets the
    command's line, and Prefect's run log keeps the rest."""
    missing = mnist_ae(user_env, "run", "--profile", "quick", "--only", "finetune", cwd=tmp_path)
    assert missing.returncode == 1
    lines = own_lines(missing.stderr)
    assert lines[-1].startswith("mnist-ae: finetune needs stages that are not in "), missing.stderr
    assert any("Encountered exception during execution: MissingUpstream" in line for line in lines)


def test_a_user_who_chose_a_log_level_sees_tensorflow_lines(user_env, tmp_path):
    shown = mnist_ae({**user_env, "TF_CPP_MIN_LOG_LEVEL": "0"}, "status", cwd=tmp_path)
    assert shown.returncode == 0
    assert [line for line in shown.stderr.splitlines() if LOG_LINE.match(line.encode())], shown.stderr


def test_a_deployment_flow_run_process_filters_tensorflow_lines(user_env):
    """A worker starts each flow run in a process with PREFECT__FLOW_RUN_ID set, which loads the entrypoint."""
    script = ("from prefect.flows import load_flow_from_entrypoint\n"
              "load_flow_from_entrypoint('flows/pipeline.py:pipeline')\n"
              "import tensorflow\n"
              "print('loaded')")
    env = {**user_env, "PREFECT__FLOW_RUN_ID": str(uuid.uuid4())}
    proc = subprocess.run([sys.executable, "-c", script], env=env, cwd=ROOT, capture_output=True, text=True,
                          timeout=300)
    assert proc.stdout == "loaded\n" and own_lines(proc.stderr) == []


# What a process writes to file descriptor 2 below Python, in order, then whether it dies on abort().
FILTERED = textwrap.dedent("""
    import os, subprocess, sys
    from flows.tf_logs import hide_tf_logs

    hide_tf_logs()
    os.write(2, b"WARNING: All log messages before absl::InitializeLog() is called are written to STDERR\\n")
    os.write(2, b"I0000 00:00:1796074953.230467    1931 port.cc:153] oneDNN custom operations are on.\\n")
    os.write(2, b"a line of a C library\\n")
    os.write(2, b"2024-01-11 05:40:05.061907: W tensorflow/core/util/x.cc:12] older format\\nafter it\\n")
    print("from Python", file=sys.stderr)
    subprocess.run(["sh", "-c", "echo from a child >&2; echo 'E1130 21:44:06.123456 77 x.cc:3] child record' >&2"])
    os.write(2, b"F0000 00:00:1796074953.230467    1931 x.cc:9] Check failed: the reason\\n")
    if sys.argv[1:] == ["abort"]:
        os.abort()
""")


@pytest.mark.parametrize("ending", ["exit", "abort"])
def test_the_filter_drops_log_records_and_passes_everything_else(tmp_path, ending):
    env = {k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}
    proc = subprocess.run([sys.executable, "-c", FILTERED, ending], env=env, cwd=ROOT, capture_output=True,
                          timeout=60)
    assert proc.returncode == (0 if ending == "exit" else -6)
    lines = proc.stderr.decode().splitlines()
    lines.remove("from Python")  # written straight to the terminal, so not ordered with the rest
    # A fatal record is kept, even when the process dies right after writing it.
    assert lines == ["a line of a C library", "after it", "from a child",
                     "F0000 00:00:1796074953.230467    1931 x.cc:9] Check failed: the reason"]
    chosen = subprocess.run([sys.executable, "-c", FILTERED, ending], env={**env, "TF_CPP_MIN_LOG_LEVEL": "0"},
                            cwd=ROOT, capture_output=True, timeout=60)
    assert b"port.cc:153] oneDNN" in chosen.stderr and b"child record" in chosen.stderr


def test_only_tensorflow_retracing_warnings_are_dropped(caplog):
    """Keras retraces for each new model the pipeline trains; TensorFlow's other warnings still show."""
    import tensorflow as tf

    for _ in range(8):
        tf.function(lambda x: x + 1)(tf.constant(1.0))  # a new function each time, as each new model brings
    logging.getLogger("tensorflow").warning("another warning")
    assert [r.getMessage() for r in caplog.records if r.name == "tensorflow"] == ["another warning"]
