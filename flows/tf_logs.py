"""Keep TensorFlow's log lines, which the user cannot act on, off the stderr of the command line and deployment runs.

TensorFlow 2.21 logs through absl straight to file descriptor 2 from C++, and some of its lines (oneDNN's notice at
library load, twice) ignore TF_CPP_MIN_LOG_LEVEL. So fd 2 becomes a pipe into a small filter process that drops
log records and passes everything else on; Python's own `sys.stderr` writes to the terminal directly. A separate
process rather than a thread: it still passes on what a crashing process wrote last, such as a fatal record.
Run as a script, this file is that filter; it imports nothing but the standard library.
"""

from __future__ import annotations

import atexit
import logging
import os
import re
import select
import signal
import subprocess
import sys

# absl's and glog's header ("I1130 21:44:06.230467    1931 port.cc:153] "; before absl::InitializeLog its clock
# reads "I0000 00:00:1796074953.230467", seconds since 1970), TensorFlow's older one
# ("2024-01-11 05:40:05.061907: I tensorflow/core/platform/cpu_feature_guard.cc:182] ") and absl's note that it
# writes to stderr until InitializeLog. Info, warning and error records only: a fatal (F) record says why the
# process dies, and is kept.
LOG_LINE = re.compile(rb"[IWE]\d{4} \d\d:\d\d:\d+\.\d+ +\d+ \S+:\d+\] "
                      rb"|\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d+: [IWE] \S+:\d+\] "
                      rb"|WARNING: All log messages before absl::InitializeLog\(\) is called are written to STDERR\r?$")
# A level the user chose for TensorFlow's C++ logs is theirs; otherwise the command line and deployment runs keep
# its log lines off stderr. Read when `flows` is imported, before it sets its default.
TF_LOG_LEVEL_CHOSEN = "TF_CPP_MIN_LOG_LEVEL" in os.environ
QUIET_S = 0.1  # an unfinished line still unfinished after this long is meant as it is (a prompt, a progress bar)


def hide_tf_logs() -> None:
    """Filter TensorFlow's log records out of this process's stderr from now on, unless the user chose
    TF_CPP_MIN_LOG_LEVEL: then its lines are what they asked for.

    Call before TensorFlow is imported. Child processes inherit the filtered stderr.
    """
    if TF_LOG_LEVEL_CHOSEN or sys.stderr is None:
        return
    try:
        terminal = os.dup(2)
    except OSError:  # no stderr at all
        return
    read_end, write_end = os.pipe()
    # -I -S: the standard library only, whatever the environment and the working directory hold.
    filter_process = subprocess.Popen([sys.executable, "-I", "-S", __file__], stdin=read_end, stdout=terminal,
                                      stderr=terminal)
    os.close(read_end)
    sys.stderr.flush()
    os.dup2(write_end, 2)
    os.close(write_end)
    sys.stderr = open(terminal, "w", buffering=1, encoding=sys.stderr.encoding, errors=sys.stderr.errors,
                      closefd=False)

    def drain() -> None:
        sys.stderr.flush()
        os.dup2(terminal, 2)  # closes this process's end of the pipe; the filter ends once every writer has
        try:
            filter_process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            pass  # a child process still holds the pipe; the filter passes on its lines after this process ends

    atexit.register(drain)


def not_retracing(record: logging.LogRecord) -> bool:
    """False for TensorFlow's tf.function retracing warnings: Keras retraces for each new model the pipeline trains,
    on purpose, and the warning asks for a change that is not the user's to make."""
    return "triggered tf.function retracing" not in record.getMessage()


def forward(source: int, target: int) -> None:
    """Copy `source` to `target` until end of file, line by line, leaving out the lines that are log records."""
    pending = b""
    writable = True

    def write(data: bytes) -> None:
        nonlocal writable
        while writable and data:
            try:
                data = data[os.write(target, data):]
            except OSError:  # the reader is gone; keep reading so that writers never block
                writable = False

    while True:
        if pending and not select.select([source], [], [], QUIET_S)[0]:
            write(pending)
            pending = b""
        chunk = os.read(source, 1 << 16)
        if not chunk:
            break
        *lines, pending = (pending + chunk).split(b"\n")
        write(b"".join(line + b"\n" for line in lines if not LOG_LINE.match(line)))
    if not LOG_LINE.match(pending):
        write(pending)


if __name__ == "__main__":
    # The filter shares the terminal's process group: Ctrl-C is for the command, which ends and so closes the pipe.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    forward(0, 1)
