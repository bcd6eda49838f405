"""Atomic file output: the one helper every writer of this project uses.

A file is written to a temporary name in its destination folder, flushed and fsynced, then
moved over the destination with ``os.replace``; a failed or interrupted write leaves any
previous file untouched and no temporary file behind.
"""

import contextlib
import json
import os
import secrets
from typing import IO, Iterator


def temp_path(path: str) -> str:
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    name = f".{os.path.basename(path)}.{os.getpid()}.{secrets.token_hex(4)}.tmp"
    return os.path.join(directory, name)


@contextlib.contextmanager
def atomic_write(path: str, mode: str = "w", **open_kwargs) -> Iterator[IO]:
    """Open a temporary file for writing; on a clean exit it replaces ``path``.

    Args:
        path: destination file; its folder is created if needed.
        mode: ``"w"`` (text) or ``"wb"`` (binary).
        open_kwargs: passed to :func:`open` (``newline``, ``buffering``, ...).
    """
    if mode not in ("w", "wb"):
        raise ValueError(f"atomic_write mode must be 'w' or 'wb', not {mode!r}")
    tmp = temp_path(path)
    try:
        with open(tmp, mode.replace("w", "x"), **open_kwargs) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_json_atomic(obj, path: str) -> None:
    """Write ``obj`` as strict, compact JSON (NaN/inf rejected) to ``path`` atomically."""
    with atomic_write(path) as f:
        json.dump(obj, f, separators=(",", ":"), allow_nan=False)
