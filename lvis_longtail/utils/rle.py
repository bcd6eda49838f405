"""Compressed RLE counts (pycocotools' string format) decoded with numpy: many masks at once
(:func:`decode_counts`), one string checked for malformation (:func:`decode_rle_string`), or
many strings checked at once (:func:`first_bad_count_string`).

A number is 5 bits per character (``ord(c) - 48``), least significant first; 0x20 marks that
more characters follow, 0x10 of the last character a negative number; from the fourth number
on, each is stored as the difference to the one two before it.
"""

from typing import List, Optional, Sequence

import numpy as np
from pycocotools import mask as mask_utils

__all__ = [
    "counts_bytes",
    "decode_counts",
    "decode_rle_string",
    "first_bad_count_string",
    "segment_cumsum",
]


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


_SIGNED_DIGIT = np.where(np.arange(256) & 0x10, (np.arange(256) & 0x1F) - 32, np.arange(256) & 0x1F)


def first_bad_count_string(strings: Sequence[str], pixels, chunk_chars: int = 1 << 20):
    """Index of the first compressed RLE string that :func:`decode_rle_string` rejects or
    whose runs do not sum to its ``pixels`` (h * w), or None if every one is valid.

    Vectorized over all strings (in chunks of about ``chunk_chars`` characters, so memory
    stays bounded): what a results file's millions of masks are checked with.
    """
    pixels = np.asarray(pixels, dtype=np.int64)
    lengths = np.fromiter(map(len, strings), np.int64, len(strings))
    char_ends = np.cumsum(lengths)
    start = 0
    while start < len(strings):
        before = char_ends[start] - lengths[start]
        stop = max(int(np.searchsorted(char_ends, before + chunk_chars, "right")), start + 1)
        bad = _bad_strings(strings[start:stop], lengths[start:stop], pixels[start:stop])
        if bad is not None:
            return start + bad
        start = stop
    return None


def _bad_strings(strings: Sequence[str], lengths: np.ndarray, pixels: np.ndarray):
    """:func:`first_bad_count_string` for one chunk."""
    try:
        chars = np.frombuffer("".join(strings).encode("ascii"), np.uint8) - np.uint8(48)
    except UnicodeEncodeError:  # non-ASCII: its bytes (>= 0x80) are rejected below
        encoded = [s.encode("utf-8", "surrogatepass") for s in strings]
        lengths = np.fromiter(map(len, encoded), np.int64, len(encoded))
        chars = np.frombuffer(b"".join(encoded), np.uint8) - np.uint8(48)
    bounds = np.zeros(len(strings) + 1, dtype=np.int64)
    np.cumsum(lengths, out=bounds[1:])
    more = (chars & 0x20) != 0
    ends = np.flatnonzero(~more)
    value_lengths = np.diff(ends, prepend=-1)
    # structure: characters '0'..'o' only, no value of more than 12 characters (60 bits),
    # each string's last character ends a value, no empty string (a mask has >= 1 pixel)
    bad = lengths == 0
    filled = np.flatnonzero(~bad)
    bad[filled] = more[bounds[filled + 1] - 1]
    if chars.max(initial=0) >= 64 or value_lengths.max(initial=0) > 12:
        for pos in (np.flatnonzero(chars >= 64)[:1], ends[value_lengths > 12][:1]):
            if len(pos):
                bad[np.searchsorted(bounds, pos[0], "right") - 1] = True
    if bad.any():  # the strings before the first malformed one may still be wrong
        first = int(np.flatnonzero(bad)[0])
        earlier = _bad_strings(strings[:first], lengths[:first], pixels[:first]) if first else None
        return first if earlier is None else earlier
    # the numbers: 5 bits per character, least significant first; the last character's 5 bits
    # are signed (0x10: negative)
    values = _SIGNED_DIGIT[chars[ends]]
    longer = np.flatnonzero(value_lengths > 1)
    if len(longer):
        firsts, longer_lengths = ends[longer] - value_lengths[longer] + 1, value_lengths[longer]
        values[longer] <<= 5 * (longer_lengths - 1)
        for k in range(int(longer_lengths.max()) - 1):
            more_digits = longer_lengths > k + 1
            longer, firsts, longer_lengths = (
                a[more_digits] for a in (longer, firsts, longer_lengths)
            )
            values[longer] += (chars[firsts + k] & 0x1F).astype(np.int64) << (5 * k)
    value_bounds = np.searchsorted(ends, bounds)
    starts = value_bounds[:-1]
    bad = np.zeros(len(strings), dtype=bool)
    if len(values) and np.abs(values).max() > pixels.min():  # a run (or difference) beyond
        limit = np.repeat(pixels, np.diff(value_bounds))  # the image; clipped, sums are safe
        bad = np.add.reduceat(np.abs(values) > limit, starts) > 0
        values = np.clip(values, -limit, limit)
    # from the fourth number on, each is the difference to the run two before it: a string
    # starting at s has the chains s+1, s+3, ... and s+2, s+4, ... (s alone), so a run is a
    # cumulative sum with stride 2 over all values, less that sum at s-1 or s (same parity)
    total = np.zeros(len(values) + 1, dtype=np.int64)  # total[k + 1]: values[k] + total[k - 1]
    total[1::2] = np.cumsum(values[0::2])
    total[2::2] = np.cumsum(values[1::2])
    runs = total[1:]
    own_parity, other_parity = total[starts + 1], total[starts]  # the sums at s and s - 1
    parity = starts % 2
    for half, offset in ((runs[0::2], 0), (runs[1::2], 1)):  # positions k with k % 2 == offset
        same = parity == offset
        first_k = starts + ((offset - starts) % 2)  # first position of this parity
        n_k = np.maximum((value_bounds[1:] - first_k + 1) // 2, 0)
        half -= np.repeat(np.where(same, own_parity, other_parity), n_k)
    runs[starts] = values[starts]
    if runs.min(initial=0) < 0:
        bad |= np.add.reduceat(runs < 0, starts) > 0
    bad |= np.add.reduceat(runs, starts) != pixels
    return int(np.flatnonzero(bad)[0]) if bad.any() else None
