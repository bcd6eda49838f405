"""Read and validate an LVIS-format json once; every reader of ground truth uses the result.

:func:`load_validated` parses a json (UTF-8/16/32, byte-order marks allowed) and checks every
record; training dicts (:mod:`.lvis_format`), metadata and class statistics, both evaluator
back-ends and the diagnostics all take its :class:`ValidatedLVIS`, never the raw file, so
nothing malformed reaches detectron2's mapper, pycocotools or lvis-api. The checks
(:mod:`.lvis_checks`, :func:`validate_lvis_dict`) raise :class:`LVISFormatError` naming the
file, the record and the field.

A parsed LVIS train json holds millions of Python objects (3-6 GB at LVIS v1's size), so
nothing keeps it beyond its use: :func:`load_validated` parses the file on every call, except
inside a :func:`shared_reads` block, where each file is parsed once and its result dropped
when the block ends. The trainer builds its model (whose losses read the class statistics
derived from the json) and its data loader in one such block, so both come from one parse,
and afterwards only detectron2's serialized training dicts and the small derived metadata
remain. Evaluation reads its split when it computes the metrics and lets it go after.
"""

import ctypes
import ctypes.util
import logging
import os
import threading
import time
from contextlib import contextmanager
from typing import Dict, Iterator

from lvis_longtail.data.lvis_checks import (  # noqa: F401  (validate_lvis_dict re-exported)
    LVISFormatError,
    ValidatedLVIS,
    validate_lvis_dict,
)
from lvis_longtail.utils.io import gc_paused, read_json

logger = logging.getLogger(__name__)


def read_lvis_json(json_file: str) -> dict:
    """Parse an LVIS-format json (no record checks; :func:`load_validated` does them)."""
    if not os.path.isfile(json_file):
        raise FileNotFoundError(
            f"LVIS-format json not found: {json_file}. The bundled synthetic dataset is made by "
            "`python -m lvis_longtail.data.synthetic --out $DETECTRON2_DATASETS/lt_synthetic`; "
            "LVIS v1 goes under $DETECTRON2_DATASETS/lvis (see the README's Data section)."
        )
    return read_json(json_file, LVISFormatError, "LVIS-format json")


_CACHE: Dict[tuple, ValidatedLVIS] = {}  # filled only while a shared_reads() block is open
_OPEN_BLOCKS = [0]
_LOCK = threading.Lock()


def _cache_key(json_file: str) -> tuple:
    st = os.stat(json_file)
    return os.path.realpath(json_file), st.st_size, st.st_mtime_ns


@contextmanager
def shared_reads() -> Iterator[None]:
    """A block in which :func:`load_validated` parses each json once and returns the same
    result to every reader; when the outermost block ends the results are dropped (and freed
    once their readers let go). Blocks may nest."""
    with _LOCK:
        _OPEN_BLOCKS[0] += 1
    try:
        yield
    finally:
        with _LOCK:
            _OPEN_BLOCKS[0] -= 1
            last = _OPEN_BLOCKS[0] == 0
            if last:
                _CACHE.clear()
        if last:
            release_freed_memory()


def release_freed_memory() -> None:
    """Hand the heap pages of freed objects back to the OS (glibc's ``malloc_trim``; a no-op
    elsewhere). Freeing a parsed json's millions of objects leaves many of its pages with the
    allocator, counted in the process's RSS and shared by every data worker forked later
    (which copies the pages it writes to). At LVIS v1 train's size this takes the RSS left
    above the imports after the loader is built from ~1.5 GB to ~0.66 GB
    (``benchmarks/lvis_scale.py``)."""
    if _LIBC is not None:
        _LIBC.malloc_trim(0)


def _load_libc():
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return libc if hasattr(libc, "malloc_trim") else None
    except OSError:
        return None


_LIBC = _load_libc()


def load_validated(json_file: str) -> ValidatedLVIS:
    """Parse and validate an LVIS-format json; inside a :func:`shared_reads` block, the result
    of the block's first call for this file (same path, size and modification time).

    Raises:
        FileNotFoundError: no such file (the message says how to make the synthetic data).
        LVISFormatError: malformed file or record (file, record and field named).
    """
    if not os.path.isfile(json_file):
        read_lvis_json(json_file)  # raises the explanatory FileNotFoundError
    key = _cache_key(json_file)
    with _LOCK:
        if key in _CACHE:
            return _CACHE[key]
    start = time.perf_counter()
    data = read_lvis_json(json_file)
    with gc_paused():
        validated = validate_lvis_dict(data, json_file)
    logger.info(
        f"Read and validated {json_file} in {time.perf_counter() - start:.1f} s: "
        f"{len(validated.images)} images, {len(validated.annotations)} annotations, "
        f"{len(validated.categories)} categories."
    )
    with _LOCK:
        if _OPEN_BLOCKS[0]:
            _CACHE[key] = validated
    return validated


def clear_cache() -> None:
    """Drop what the open :func:`shared_reads` blocks hold (their later reads parse again)."""
    with _LOCK:
        _CACHE.clear()
