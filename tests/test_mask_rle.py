"""Mask RLEs from transitions: byte for byte pycocotools' and detectron2's encoding."""

import numpy as np
import pytest
import torch
from detectron2.evaluation.coco_evaluation import instances_to_coco_json
from detectron2.layers.mask_ops import paste_masks_in_image
from detectron2.structures import Boxes, Instances
from pycocotools import mask as mask_utils

from lvis_longtail.evaluation import mask_rle
from lvis_longtail.evaluation.mask_rle import encode_masks, transition_positions


def pycocotools_rles(masks: torch.Tensor):
    """The reference: pycocotools on the uint8 Fortran-order copy (the pre-existing path)."""
    return mask_utils.encode(np.asfortranarray(masks.permute(1, 2, 0).numpy().astype(np.uint8)))


def pasted_instances(n, h, w, seed=0):
    """``n`` detections with masks pasted into an (h, w) image as detectron2 does, boxes of
    8 px up to most of the image, some touching the borders."""
    g = torch.Generator().manual_seed(seed)
    side = torch.exp(torch.empty(n).uniform_(np.log(8), np.log(0.9 * min(h, w)), generator=g))
    wh = torch.stack([side * torch.empty(n).uniform_(0.6, 1.4, generator=g)] * 2, 1)
    wh = torch.minimum(wh, torch.tensor([w - 1.0, h - 1.0]))
    xy = torch.rand(n, 2, generator=g) * (torch.tensor([w, h]) - wh)
    xy[: n // 4] = 0  # top-left corner
    boxes = torch.cat([xy, xy + wh], 1)
    boxes[n // 4 : n // 2, 2:] = torch.tensor([w, h], dtype=torch.float32)  # bottom-right
    probs = torch.nn.functional.avg_pool2d(torch.rand(n, 1, 28, 28, generator=g), 5, 1, 2)
    inst = Instances((h, w))
    inst.pred_boxes = Boxes(boxes)
    inst.scores = torch.rand(n, generator=g)
    inst.pred_classes = torch.randint(0, 1203, (n,), generator=g)
    inst.pred_masks = paste_masks_in_image(probs[:, 0] * 1.6 - 0.3, inst.pred_boxes, (h, w))
    return inst


def test_pasted_masks_equal_detectron2_and_pycocotools():
    inst = pasted_instances(60, 96, 120)
    inst.pred_masks[0] = False  # empty
    inst.pred_masks[1] = True  # full
    inst.pred_masks[2, :, -1] = True  # last column only: a run ends at the last pixel
    inst.pred_masks[3, -1, :] = True  # last row: a run across every seam
    rles = encode_masks(inst.pred_masks)
    assert rles == pycocotools_rles(inst.pred_masks)
    expected = [r["segmentation"] for r in instances_to_coco_json(inst, 7)]
    assert [{"size": r["size"], "counts": r["counts"].decode()} for r in rles] == expected
    assert mask_utils.area(rles).tolist() == inst.pred_masks.sum((1, 2)).tolist()


@pytest.mark.parametrize("shape", [(5, 1, 1), (4, 1, 7), (4, 9, 1), (6, 2, 3), (3, 17, 13)])
def test_random_masks_of_every_shape(shape):
    g = torch.Generator().manual_seed(sum(shape))
    for density in (0.0, 0.1, 0.5, 0.9, 1.0):
        masks = torch.rand(*shape, generator=g) < density
        assert encode_masks(masks) == pycocotools_rles(masks), density


def test_no_detections_and_no_foreground():
    assert encode_masks(torch.zeros(0, 30, 40, dtype=torch.bool)) == []
    empty = torch.zeros(3, 30, 40, dtype=torch.bool)
    index, position = transition_positions(empty)
    assert len(index) == len(position) == 0
    assert encode_masks(empty) == pycocotools_rles(empty)
    assert [r["counts"] for r in encode_masks(empty)] == [mask_utils.encode(
        np.zeros((30, 40, 1), np.uint8, order="F"))[0]["counts"]] * 3  # fmt: skip


def test_transition_positions_by_hand():
    # 3x2 mask, column-major pixels: (0,0) (1,0) (2,0) (0,1) (1,1) (2,1) = 1 1 0 0 1 1
    mask = torch.tensor([[[1, 0], [1, 1], [0, 1]]], dtype=torch.bool)
    index, position = transition_positions(mask)
    assert index.tolist() == [0, 0, 0] and position.tolist() == [0, 2, 4]
    assert mask_utils.frPyObjects([{"size": [3, 2], "counts": [0, 2, 2, 2]}], 3, 2) == (
        encode_masks(mask)
    )


def test_non_boolean_masks_follow_the_uint8_conversion():
    g = torch.Generator().manual_seed(0)
    masks = torch.rand(4, 12, 10, generator=g) * 1.5  # values >= 1 are foreground in uint8
    assert encode_masks(masks) == pycocotools_rles(masks)
    assert encode_masks(masks.to(torch.uint8)) == pycocotools_rles(masks)


def test_tensor_path_equals_the_numpy_path():
    """Off the host the same steps run on tensors (torch indexing and nonzero); on CPU here."""
    masks = pasted_instances(40, 64, 80, seed=3).pred_masks[:, :, 5:]  # non-contiguous view
    u8 = masks.view(torch.uint8)
    on_tensors = mask_rle._positions(masks, u8)
    on_arrays = mask_rle._positions(masks.numpy(), u8)
    for a, b in zip(on_tensors, on_arrays):
        assert a.dtype == b.dtype == np.int64 and np.array_equal(a, b)
    assert encode_masks(masks) == pycocotools_rles(masks)
