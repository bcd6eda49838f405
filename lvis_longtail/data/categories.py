"""The ``categories`` of an LVIS-format json without parsing its images and annotations.

Counting classes, LVIS frequency groups and the per-class training image counts need only
the categories list; parsing and validating the whole LVIS v1 training json for them costs
about a minute and several GB per process. :func:`read_categories` reads only the bytes of
the top-level ``"categories"`` value:

- it looks for the key in the first and the last :data:`WINDOW` bytes of the file (LVIS's
  jsons put it last; the bundled synthetic jsons too), decodes the value after it with
  ``json.JSONDecoder.raw_decode``, and proves that the key belongs to the outermost object by
  counting the brackets outside strings between the key and the nearer end of the file;
- anything else (the key elsewhere, a UTF-16/32 file, a malformed value) falls back to
  parsing the whole json, with a log line that says so.

The records are checked as :func:`~lvis_longtail.data.lvis_json.load_validated` checks
categories (id, name, frequency, counts; errors name file, record and field) and returned
sorted by id, as the validated dataset holds them.
"""

import codecs
import functools
import itertools
import json
import logging
import mmap
import os
import re
from typing import List, Optional

from detectron2.data import MetadataCatalog

from lvis_longtail.data.lvis_checks import LVISFormatError, _categories, _Checker
from lvis_longtail.data.lvis_json import read_lvis_json

logger = logging.getLogger(__name__)

__all__ = [
    "WINDOW",
    "category_fields",
    "dataset_categories",
    "dataset_class_names",
    "read_categories",
]

WINDOW = 64 << 20  # bytes searched at each end of the file for the key
_KEY = b'"categories"'
_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"', re.DOTALL)
_BOMS = (codecs.BOM_UTF32_LE, codecs.BOM_UTF32_BE, codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)


def read_categories(json_file: str) -> List[dict]:
    """The validated ``categories`` of an LVIS-format json, sorted by id (module docstring).

    Raises:
        FileNotFoundError: no such file (the message says how to make the synthetic data).
        LVISFormatError: no non-empty top-level ``categories`` list, or a malformed category.
    """
    if not os.path.isfile(json_file):
        read_lvis_json(json_file)  # raises the explanatory FileNotFoundError
    st = os.stat(json_file)
    cats = _read_categories(os.path.realpath(json_file), st.st_size, st.st_mtime_ns, json_file)
    return [dict(c) for c in cats]


@functools.lru_cache(maxsize=8)
def _read_categories(path: str, size: int, mtime_ns: int, json_file: str) -> List[dict]:
    """:func:`read_categories` of one version (size, mtime) of a file, cached."""
    del size, mtime_ns  # the cache key
    cats, why = _scan(path)
    if cats is None:
        logger.info(f"{json_file}: categories read by parsing the whole json ({why})")
        data = read_lvis_json(path)
        cats = data.get("categories") if isinstance(data, dict) else None
    if not isinstance(cats, list) or not cats:
        raise LVISFormatError(
            f"{json_file}: top-level field 'categories' missing, empty or not a list"
        )
    return _categories(_Checker(json_file), cats)


def dataset_categories(name: str) -> Optional[List[dict]]:
    """The categories of the registered dataset ``name``, from its metadata's ``json_file``
    by :func:`read_categories` (no image or annotation is read); None without a json_file.

    Raises:
        FileNotFoundError: the json does not exist.
    """
    json_file = MetadataCatalog.get(name).as_dict().get("json_file")
    return None if json_file is None else read_categories(json_file)


def dataset_class_names(name: str) -> Optional[List[str]]:
    """Class names of the registered dataset ``name`` in contiguous-id order: its metadata's
    ``thing_classes`` when already set (derived or registered), else the names of
    :func:`dataset_categories` (without deriving the rest of the metadata); None when neither
    exists."""
    known = MetadataCatalog.get(name).as_dict()  # no lazy derivation
    if "thing_classes" in known:
        return list(known["thing_classes"])
    cats = dataset_categories(name)
    return None if cats is None else [c["name"] for c in cats]


def category_fields(categories: List[dict], key: str) -> Optional[list]:
    """``[c[key] for c in categories]`` when every category has ``key``, else None."""
    if all(key in c for c in categories):
        return [c[key] for c in categories]
    return None


def _scan(json_file: str):
    """(categories, "") from the key near either end of the file, or (None, why not)."""
    with open(json_file, "rb") as f:
        if os.fstat(f.fileno()).st_size == 0:
            return None, "empty file"
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
            if mm[:4].startswith(_BOMS):
                return None, "not UTF-8"
            size = len(mm)
            tail = max(0, size - WINDOW)
            # the end first (LVIS's place for the key), then the start; lazily, so a file
            # with the key at its end is read only there
            for pos in itertools.chain(
                _find_all(mm, tail, size), _find_all(mm, 0, min(WINDOW, tail))
            ):
                found = _value_at(mm, pos)
                if found is None:
                    continue
                value, end = found
                # the key's depth, counted on the shorter side of it: 1 = the outermost object
                if end >= tail and _net_brackets(mm, end, size) == -1:
                    return value, ""
                if pos < WINDOW and _net_brackets(mm, 0, pos) == 1:
                    return value, ""
            return None, "no top-level 'categories' key near the start or the end of the file"


def _find_all(mm, start: int, stop: int):
    """Positions of the quoted key in ``mm[start:stop]``, last first (a lazy iterator)."""
    pos = mm.rfind(_KEY, start, stop)
    while pos >= 0:
        yield pos
        pos = mm.rfind(_KEY, start, pos)


def _value_at(mm, pos: int):
    """(value, end byte) of a ``"categories": [...]`` list starting at ``pos``, or None."""
    i = _skip_space(mm, pos + len(_KEY))
    if mm[i : i + 1] != b":":
        return None  # a string value "categories", not a key
    start = _skip_space(mm, i + 1)
    if mm[start : start + 1] != b"[":
        return None
    size, decoder = len(mm), json.JSONDecoder()
    length = 1 << 20
    while True:
        stop = min(size, start + length)
        try:  # a character cut at the end waits in the incremental decoder
            text = codecs.getincrementaldecoder("utf-8")().decode(mm[start:stop])
        except UnicodeDecodeError:
            return None  # the full parse names the problem
        try:
            value, consumed = decoder.raw_decode(text)
        except json.JSONDecodeError:
            if stop == size:
                return None
            length *= 4
            continue
        return value, start + len(text[:consumed].encode("utf-8"))


def _skip_space(mm, i: int) -> int:
    while mm[i : i + 1] in (b" ", b"\t", b"\n", b"\r"):
        i += 1
    return i


def _net_brackets(mm, start: int, stop: int) -> int:
    """Opening minus closing brackets of ``mm[start:stop]`` outside strings (the span must
    start outside a string)."""
    text = _STRING.sub(b"", mm[start:stop])
    return text.count(b"[") + text.count(b"{") - text.count(b"]") - text.count(b"}")
