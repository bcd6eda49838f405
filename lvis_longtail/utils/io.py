"""File input and output helpers: the one atomic writer every writer of this project uses,
and the one json reader for every json it reads (ground truth and results).

A file is written to a temporary name in its destination folder
(``.<name>.<host>.<pid>.<random>.tmp``), flushed and fsynced, then moved over the destination
with ``os.replace`` and the folder fsynced: a failed or interrupted write leaves any previous
file untouched. A failed write removes its temporary file; a killed one cannot, so the next
write of the same destination removes the temporary files whose writer is gone (a process of
this host that no longer runs, or another host's file untouched for :data:`STALE_AFTER_S`).
A write error names the destination.
"""

import codecs
import contextlib
import fnmatch
import gc
import glob
import json
import logging
import os
import re
import secrets
import socket
import time
from typing import IO, Iterator, List

logger = logging.getLogger(__name__)

# A temporary file written from another host is taken as abandoned once it has not been
# modified for this long (its writer's process cannot be looked up from here).
STALE_AFTER_S = 3600.0


def _host() -> str:
    """This host's name as it appears in temporary file names (no dots)."""
    return re.sub(r"[^A-Za-z0-9_-]", "_", socket.gethostname()) or "host"


def temp_path(path: str) -> str:
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    name = f".{os.path.basename(path)}.{_host()}.{os.getpid()}.{secrets.token_hex(4)}.tmp"
    return os.path.join(directory, name)


def _pid_running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def _writer_gone(entry: os.DirEntry, host: str, pid: str) -> bool:
    if host == _host() and pid.isdigit():
        return int(pid) != os.getpid() and not _pid_running(int(pid))
    try:
        return time.time() - entry.stat().st_mtime > STALE_AFTER_S
    except FileNotFoundError:
        return False


def remove_stale_temps(directory: str, pattern: str) -> List[str]:
    """Remove the temporary files of interrupted writes into ``directory`` whose destination
    name matches ``pattern`` (an ``fnmatch`` pattern; ``glob.escape`` an exact name) and
    whose writer is gone. Returns the removed paths."""
    removed = []
    try:
        entries = list(os.scandir(directory))
    except FileNotFoundError:
        return removed
    for entry in entries:
        if not (entry.name.startswith(".") and entry.name.endswith(".tmp")):
            continue
        parts = entry.name[1:].rsplit(".", 4)  # <name>, host, pid, random, "tmp"
        if len(parts) != 5 or not fnmatch.fnmatchcase(parts[0], pattern):
            continue
        if _writer_gone(entry, parts[1], parts[2]):
            with contextlib.suppress(FileNotFoundError):
                os.remove(entry.path)
                removed.append(entry.path)
    if removed:
        logger.info(f"Removed {len(removed)} temporary file(s) of interrupted writes: {removed}")
    return removed


def _fsync_directory(directory: str) -> None:
    """Make a rename in ``directory`` durable (a no-op where the file system refuses)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _naming(error: OSError, path: str, tmp: str) -> OSError:
    """``error`` with the destination as its file name, if it names none or the temporary
    file (a full disk reports ``[Errno 28] No space left on device`` without a name)."""
    if error.errno is None or error.filename not in (None, tmp):
        return error
    return OSError(error.errno, error.strerror, path)


@contextlib.contextmanager
def atomic_write(path: str, mode: str = "w", **open_kwargs) -> Iterator[IO]:
    """Open a temporary file for writing; on a clean exit it replaces ``path``.

    Args:
        path: destination file; its folder is created if needed.
        mode: ``"w"`` (text) or ``"wb"`` (binary).
        open_kwargs: passed to :func:`open` (``newline``, ``buffering``, ...).

    Raises:
        OSError: a failed write, naming ``path`` (ENOSPC, EACCES, ...).
    """
    if mode not in ("w", "wb"):
        raise ValueError(f"atomic_write mode must be 'w' or 'wb', not {mode!r}")
    tmp = temp_path(path)
    directory = os.path.dirname(tmp)
    remove_stale_temps(directory, glob.escape(os.path.basename(path)))
    try:
        with open(tmp, mode.replace("w", "x"), **open_kwargs) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _fsync_directory(directory)
    except OSError as e:
        named = _naming(e, path, tmp)
        if named is e:
            raise
        raise named from e
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_json_atomic(obj, path: str) -> None:
    """Write ``obj`` as strict, compact JSON (NaN/inf rejected) to ``path`` atomically."""
    with atomic_write(path) as f:
        json.dump(obj, f, separators=(",", ":"), allow_nan=False)


@contextlib.contextmanager
def gc_paused():
    """Pause Python's cyclic garbage collector: building millions of small dicts and lists
    (a parsed LVIS json, a results file) otherwise triggers full collections that scan them
    all over again (2.5x the time of parsing a 1.5M-record json). Parsed json forms no
    reference cycles; the previous state is restored."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


_BOMS = (
    (codecs.BOM_UTF32_LE, "utf-32"),
    (codecs.BOM_UTF32_BE, "utf-32"),
    (codecs.BOM_UTF8, "utf-8-sig"),
    (codecs.BOM_UTF16_LE, "utf-16"),
    (codecs.BOM_UTF16_BE, "utf-16"),
)


def _json_encoding(head: bytes) -> str:
    """The encoding of a json file from its first bytes (RFC 8259: UTF-8, -16 or -32, with
    or without a byte-order mark), as :func:`json.loads` detects it for bytes."""
    for bom, encoding in _BOMS:
        if head.startswith(bom):
            return encoding
    if len(head) >= 4:
        if not head[0] and not head[1] and not head[2]:
            return "utf-32-be"
        if not head[1] and not head[2] and not head[3]:
            return "utf-32-le"
        if not head[0]:
            return "utf-16-be"
        if not head[1]:
            return "utf-16-le"
    return "utf-8"


def read_json(path: str, error: type = ValueError, what: str = "json"):
    """Parse a json file, with its encoding detected (UTF-8/16/32, byte-order marks allowed)
    and the cyclic garbage collector paused.

    Args:
        path: the file.
        error: the exception class raised for a file that is not valid JSON text.
        what: what the file is, for messages ("LVIS-format json", "results file").

    Raises:
        FileNotFoundError: no such file.
        error: undecodable bytes (the offset is named) or invalid JSON (line and column).
    """
    with open(path, "rb") as f:
        head = f.read(4)
    encoding = _json_encoding(head)
    try:
        with open(path, encoding=encoding) as f, gc_paused():
            return json.load(f)
    except UnicodeDecodeError as e:
        raise error(
            f"{path}: the {what} is not {encoding} text (bytes {e.start}-{e.end} of the "
            f"decoded stream: {e.reason}); save it as UTF-8"
        ) from None
    except json.JSONDecodeError as e:
        size = os.path.getsize(path)
        end = e.doc.rstrip()[-1:]
        hint = " (corrupted)" if end in ("]", "}") else " (truncated?)"
        raise error(
            f"{path}: the {what} is not valid JSON{hint}: {e.msg} at line {e.lineno} column "
            f"{e.colno}; the file has {size:,} bytes"
        ) from None
