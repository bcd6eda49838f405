"""Convert the weights of mmdetection's FPG neck to lvis_longtail's :class:`FPG` names.

    python -m lvis_longtail.tools.convert_mmdet_fpg IN OUT [--prefix neck.] [--first-level 2]

``IN``: an mmdetection checkpoint (its ``state_dict``) or a bare state dict; the neck's keys
are those under ``--prefix`` (``neck.`` in a whole detector's checkpoint, "" for a neck's own
state dict). ``OUT``: a detectron2 checkpoint ``{"model": ...}`` holding only the neck, under
``backbone.`` (load it with ``MODEL.WEIGHTS``; the bottom-up network's and the heads' weights
come from elsewhere). mmdetection 3.3.0's names (``mmdet/models/necks/fpg.py``) map as:

* ``lateral_convs.{i}.*`` -> ``laterals.{i}.*``;
* ``fpn_transitions.{k}.{l}.{same_up|across_lateral|across_down|across_skip}.*`` ->
  ``grid.{k}.p{first + l}.{same|across_lateral|across_down|across_skip}.conv.*`` (the
  ConvModule's ``conv`` keeps its name, its ``bn``/``gn`` becomes the conv's ``norm``);
* ``output_transition.{l}.conv_out.conv.*`` -> ``outputs.{l}.*``.

Keys of transitions lvis_longtail does not build (top-down paths' ``same_down``,
``across_up``) are rejected, as is any other key under the prefix.
"""

import argparse
import re
from typing import Dict

import torch

from lvis_longtail.utils.io import atomic_write

__all__ = ["convert_mmdet_fpg"]

_TRANSITIONS = {
    "same_up": "same",
    "across_lateral": "across_lateral",
    "across_down.conv": "across_down",
    "across_skip": "across_skip",
}
# a ConvModule (conv, then bn or gn) directly, or inside across_down's UpInterpolationConv
_GRID = re.compile(
    r"fpn_transitions\.(\d+)\.(\d+)\.(same_up|across_lateral|across_skip|across_down\.conv)"
    r"\.(conv|bn|gn)\.(\w+)$"
)
_LATERAL = re.compile(r"lateral_convs\.(\d+)\.(weight|bias)$")
_OUTPUT = re.compile(r"output_transition\.(\d+)\.conv_out\.conv\.(weight|bias)$")


def _rename(key: str, first_level: int) -> str:
    """lvis_longtail's name of the mmdetection FPG key ``key`` (without prefix)."""
    m = _LATERAL.match(key)
    if m:
        return f"laterals.{m[1]}.{m[2]}"
    m = _OUTPUT.match(key)
    if m:
        return f"outputs.{m[1]}.{m[2]}"
    m = _GRID.match(key)
    if m:
        layer = "conv" if m[4] == "conv" else "conv.norm"
        return f"grid.{m[1]}.p{first_level + int(m[2])}.{_TRANSITIONS[m[3]]}.{layer}.{m[5]}"
    raise ValueError(
        f"mmdetection FPG key {key!r} has no lvis_longtail counterpart (supported: laterals, "
        "bottom-up transitions same_up/across_lateral/across_down/across_skip, output convs)"
    )


def convert_mmdet_fpg(
    state: Dict[str, torch.Tensor], prefix: str = "neck.", first_level: int = 2,
    out_prefix: str = "backbone.",
) -> Dict[str, torch.Tensor]:  # fmt: skip
    """The neck's tensors of an mmdetection state dict, renamed for :class:`FPG`.

    Args:
        state: mmdetection state dict; only the keys under ``prefix`` are converted.
        prefix: the neck's key prefix in ``state`` ("neck." in a detector, "" alone).
        first_level: stage of the finest level (2: P2, mmdetection's ``start_level`` 0 on C2).
        out_prefix: prefix of the returned keys ("backbone." for a detectron2 model).

    Returns:
        ``{lvis_longtail name: tensor}``.

    Raises:
        ValueError: no key under ``prefix``, or a key that :class:`FPG` has no place for.
    """
    neck = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
    if not neck:
        raise ValueError(f"no key starts with {prefix!r} (keys: {sorted(state)[:5]} ...)")
    return {out_prefix + _rename(k, first_level): v for k, v in neck.items()}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("input", help="mmdetection checkpoint or state dict (.pth)")
    p.add_argument("output", help="detectron2 checkpoint to write (.pth)")
    p.add_argument("--prefix", default="neck.", help="the neck's key prefix in the input")
    p.add_argument("--first-level", type=int, default=2, help="stage of the finest level")
    args = p.parse_args(argv)
    ckpt = torch.load(args.input, map_location="cpu", weights_only=False)
    state = ckpt.get("state_dict", ckpt) if isinstance(ckpt, dict) else None
    if not isinstance(state, dict):
        raise SystemExit(f"{args.input}: not a checkpoint dict (got {type(ckpt).__name__})")
    try:
        model = convert_mmdet_fpg(state, args.prefix, args.first_level)
    except ValueError as e:
        raise SystemExit(f"{args.input}: {e}") from None
    with atomic_write(args.output, "wb") as f:
        torch.save({"model": model, "__author__": "mmdetection FPG, converted"}, f)
    print(f"wrote {len(model)} tensors to {args.output}")


if __name__ == "__main__":
    main()
