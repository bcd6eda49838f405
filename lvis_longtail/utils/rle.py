"""Compressed RLE counts (pycocotools' string format) decoded with numpy: many masks at once
(:func:`decode_counts`) or one string checked for malformation (:func:`decode_rle_string`).

A number is 5 bits per character (``ord(c) - 48``), least significant first; 0x20 marks that
more characters follow, 0x10 of the last character a negative number; from the fourth number
on, each is stored as the difference to the one two before it.
"""

from typing import List, Optional, Sequence

import numpy as np
from pycocotools import mask as mask_utils

__all__ = ["counts_bytes", "decode_counts", "decode_rle_string", "segment_cumsum"]


def counts_bytes(rle: dict) -> bytes:
    """The compressed counts of an RLE (str, bytes or uncompressed list counts) as bytes."""
    counts = rle["counts"]
    if isinstance(counts, str):
        return counts.encode("ascii")
    if isinstance(counts, bytes):
        return counts
    return mask_utils.frPyObjects(rle, *rle["size"])["counts"]  # uncompressed counts


def segment_cumsum(values: np.ndarray, starts: np.ndarray) -> np.ndarray:
    """Cumulative sums of ``values`` restarting at each index of ``starts`` (sorted, 0 first)."""
    total = np.cumsum(values)
    before = np.zeros(len(starts), dtype=total.dtype)
    before[1:] = total[starts[1:] - 1]
    sizes = np.diff(np.append(starts, len(values)))
    return total - np.repeat(before, sizes)


def decode_counts(rles: Sequence[dict]):
    """Run lengths of compressed RLEs, all at once (pycocotools' ``rleFrString``, vectorized).

    Returns:
        (counts, bounds): (M,) int64 run lengths of all masks, background first; mask i's are
        ``counts[bounds[i]:bounds[i + 1]]``.
    """
    strings = [counts_bytes(r) for r in rles]
    chars = np.frombuffer(b"".join(strings), np.uint8).astype(np.int64) - 48
    char_bounds = np.zeros(len(strings) + 1, dtype=np.int64)
    np.cumsum([len(s) for s in strings], out=char_bounds[1:])
    # a number is 5 bits per character, least significant first; 0x20 = more characters follow,
    # 0x10 of the last character = negative
    ends = np.flatnonzero((chars & 0x20) == 0)
    firsts = np.zeros(len(ends), dtype=np.int64)
    firsts[1:] = ends[:-1] + 1
    lengths = ends - firsts + 1
    shift = 5 * (np.arange(len(chars)) - np.repeat(firsts, lengths))
    values = (
        np.add.reduceat((chars & 0x1F) << shift, firsts) if len(ends) else np.zeros(0, np.int64)
    )
    negative = (chars[ends] & 0x10) != 0
    values[negative] -= np.left_shift(1, 5 * lengths[negative])
    bounds = np.searchsorted(firsts, char_bounds)
    # from the fourth number on, each is stored as the difference to the one two before it
    per_mask = np.diff(bounds)
    index = np.arange(len(values)) - np.repeat(bounds[:-1], per_mask)
    chain = np.repeat(np.arange(len(strings)) * 3, per_mask) + np.where(
        index == 0, 0, np.where(index % 2 == 1, 1, 2)
    )
    order = np.argsort(chain, kind="stable")
    sorted_chain = chain[order]
    starts = np.flatnonzero(np.r_[True, sorted_chain[1:] != sorted_chain[:-1]])
    counts = np.empty_like(values)
    counts[order] = segment_cumsum(values[order], starts) if len(values) else values
    return counts, bounds


def decode_rle_string(counts: str) -> Optional[List[int]]:
    """The run lengths of one compressed RLE string, or None if it is malformed (a character
    outside '0'..'o', a truncated value, a value of more than 60 bits or a negative run)."""
    try:
        chars = np.frombuffer(counts.encode("ascii"), np.uint8).astype(np.int64) - 48
    except UnicodeEncodeError:
        return None
    more = (chars & 0x20) != 0
    if ((chars < 0) | (chars >= 64)).any() or (len(chars) and more[-1]):
        return None
    if len(chars) and np.diff(np.r_[-1, np.flatnonzero(~more)]).max() > 12:
        return None
    runs, _ = decode_counts([{"counts": counts}])
    return None if (runs < 0).any() else runs.tolist()
