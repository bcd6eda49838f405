"""Compressed RLEs of full-image masks from their transitions, found on the masks' device.

pycocotools encodes a mask as the lengths of its runs in column-major order, which needs a
transposed (Fortran-order) uint8 copy of every full-resolution mask and a pass over every
pixel on the host: for 300 pasted masks of an 800x1333 image that is 320 MB moved and scanned
per image, although a pasted mask is zero almost everywhere. The runs only depend on where
the value changes in that order, and a change happens either between two pixels of a column
(a pixel differs from the one above it), at the seam between the last pixel of a column and
the first of the next, or at the very first pixel. :func:`encode_masks` compares each row
with the row above on the masks' device (numpy for host tensors, torch elsewhere: both one
vectorized pass without a transposed copy), copies only the positions of the changes to the
host and hands the run lengths to pycocotools' C code, which compresses them. The result is
byte for byte ``mask_utils.encode(np.asfortranarray(masks.permute(1, 2, 0).numpy()))``, the
RLEs detectron2's ``instances_to_coco_json`` writes.
"""

from typing import List

import numpy as np
import torch
from pycocotools import mask as mask_utils

__all__ = ["encode_masks", "transition_positions"]


def _flat_nonzero(x) -> np.ndarray:
    """Flat indices (int64, ascending) of the true entries of a numpy array or a tensor."""
    if isinstance(x, np.ndarray):
        return np.flatnonzero(x)
    return x.reshape(-1).nonzero()[:, 0].cpu().numpy()


def _inner_changes(binary, u8: torch.Tensor):
    """(mask index, x, y) of the pixels (y >= 1) that differ from the pixel above them.

    Only rows next to a foreground row can hold one: those rows are gathered once, and each
    is compared with the gathered row before it where that is the row above it.
    """
    n, h, w = u8.shape
    fg = (u8.amax(dim=2) > 0).cpu().numpy()  # (N, H): the rows with foreground
    near = fg.copy()
    near[:, 1:] |= fg[:, :-1]
    near[:, :-1] |= fg[:, 1:]
    index, y = np.divmod(np.flatnonzero(near), h)
    if isinstance(binary, np.ndarray):
        rows = binary[index, y]
    else:
        rows = binary[torch.from_numpy(index).to(u8.device), torch.from_numpy(y).to(u8.device)]
    pair, x = np.divmod(_flat_nonzero(rows[1:] != rows[:-1]), w)
    below = pair + 1
    keep = (index[below] == index[pair]) & (y[below] == y[pair] + 1)  # the row above it
    return index[below[keep]], x[keep], y[below[keep]]


def _positions(binary, u8: torch.Tensor):
    """:func:`transition_positions` of ``binary`` ((N, H, W) bool, a numpy array or a tensor;
    ``u8`` the same masks as a uint8 tensor)."""
    n, h, w = u8.shape
    index, x, y = _inner_changes(binary, u8)
    indices, positions = [index], [x * h + y]
    # the seam: the first pixel of column x + 1 differs from the last pixel of column x
    index, x = np.divmod(_flat_nonzero(binary[:, 0, 1:] != binary[:, -1, :-1]), max(w - 1, 1))
    indices.append(index)
    positions.append((x + 1) * h)
    # the first pixel of the mask is foreground
    first = _flat_nonzero(binary[:, 0, 0])
    indices.append(first)
    positions.append(np.zeros_like(first))
    keys = np.concatenate(indices) * (h * w) + np.concatenate(positions)
    keys.sort()
    return np.divmod(keys, h * w)


def transition_positions(masks: torch.Tensor):
    """Where each mask's value changes along pycocotools' column-major order.

    Args:
        masks: (N, H, W) bool, or numbers (nonzero after conversion to uint8 is foreground,
            as pycocotools reads the uint8 copy detectron2 makes), on any device.

    Returns:
        ``(mask_index, position)``, two int64 numpy arrays of the same length, sorted by mask,
        then position: pixel ``position`` (``x * H + y``) of mask ``mask_index`` differs from
        the pixel before it in that order (the first pixel is compared with 0).
    """
    is_bool = masks.dtype == torch.bool
    u8 = masks.view(torch.uint8) if is_bool else masks.to(torch.uint8)
    binary = masks if is_bool else u8 != 0
    if binary.device.type == "cpu":
        binary = binary.numpy()  # numpy's gather, comparison and flatnonzero are faster here
    return _positions(binary, u8)


def encode_masks(masks: torch.Tensor) -> List[dict]:
    """pycocotools' compressed RLEs of full-image masks (see the module docstring).

    Args:
        masks: (N, H, W) bool (or numbers, see :func:`transition_positions`), any device.

    Returns:
        N dicts ``{"size": [H, W], "counts": bytes}``, identical to
        ``mask_utils.encode(np.asfortranarray(masks.permute(1, 2, 0).numpy().astype(np.uint8)))``.
    """
    n, h, w = masks.shape
    if n == 0:
        return []
    index, position = transition_positions(masks)
    bounds = np.searchsorted(index, np.arange(n + 1))  # mask i: [bounds[i], bounds[i + 1])
    num_changes = np.diff(bounds)
    # the run ending at each change: its distance to the previous change of its mask (or 0)
    runs = np.diff(position, prepend=0)
    first = bounds[:-1][num_changes > 0]
    runs[first] = position[first]
    last = np.zeros(n, dtype=np.int64)  # each mask's last change (0: none)
    last[num_changes > 0] = position[bounds[1:][num_changes > 0] - 1]
    runs = np.insert(runs, bounds[1:], h * w - last)  # each mask's last run, to its end
    starts = bounds[:-1] + np.arange(n)
    uncompressed = [
        {"size": [h, w], "counts": runs[s : s + k + 1]}
        for s, k in zip(starts.tolist(), num_changes.tolist())
    ]
    return mask_utils.frPyObjects(uncompressed, h, w)
