"""Helpers of the fault tests: leftovers of killed writers."""

import os
import subprocess
import sys
import time

from lvis_longtail.utils import io as io_mod


def dead_pid() -> int:
    """The pid of a process of this host that has exited (and was reaped)."""
    proc = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)  # fmt: skip
    return int(proc.stdout)


def temp_of(path, pid, host=None, age_s=0.0) -> str:
    """A temporary file as a killed ``atomic_write(path)`` of process ``pid`` leaves it."""
    name = f".{os.path.basename(path)}.{host or io_mod._host()}.{pid}.0badf00d.tmp"
    tmp = os.path.join(os.path.dirname(path), name)
    with open(tmp, "wb") as f:
        f.write(b"x" * 4096)
    if age_s:
        past = time.time() - age_s
        os.utime(tmp, (past, past))
    return tmp
