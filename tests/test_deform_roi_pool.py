"""Deformable RoI pooling: zero offsets are detectron2's ROIAlignV2, shifted bins are RoIAlign
of the shifted bin, gradients reach the offsets, and the ROI heads build it from POOLER_TYPE."""

import itertools

import pytest
import torch
from conftest import make_batch, tiny_cfg
from detectron2.modeling import build_model
from detectron2.modeling.poolers import (
    ROIPooler,
    assign_boxes_to_levels,
    convert_boxes_to_pooler_format,
)
from detectron2.structures import Boxes
from torchvision.ops import roi_align

from lvis_longtail.layers.deform_roi_pool import DeformROIPooler, deform_roi_align


def random_boxes(g, n, size):
    xy = torch.rand(n, 2, generator=g) * size * 0.8
    wh = torch.rand(n, 2, generator=g) * size * 0.6 + 1
    return Boxes(torch.cat([xy, xy + wh], dim=1))


@pytest.mark.parametrize("sampling_ratio", [0, 2])
def test_new_pooler_equals_roialignv2(sampling_ratio):
    g = torch.Generator().manual_seed(sampling_ratio)
    scales = (1 / 4, 1 / 8, 1 / 16, 1 / 32)
    x = [torch.randn(2, 8, int(128 * s), int(160 * s), generator=g) for s in scales]
    boxes = [random_boxes(g, 13, 128), random_boxes(g, 7, 128)]
    boxes[1].tensor[0] = torch.tensor([-20.0, -10.0, 170.0, 150.0])  # beyond the image
    kwargs = dict(output_size=7, scales=scales, sampling_ratio=sampling_ratio)
    plain = ROIPooler(pooler_type="ROIAlignV2", canonical_box_size=36, **kwargs)
    deform = DeformROIPooler(in_channels=8, canonical_box_size=36, fc_dim=16, **kwargs)
    ours, ref = deform(x, boxes), plain(x, boxes)
    assert ours.shape == ref.shape == (20, 8, 7, 7)
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)
    assert len(set(assign_boxes_to_levels(boxes, 2, 5, 36, 4).tolist())) >= 3  # 3+ levels


def test_shifted_bins_are_roi_align_of_shifted_bins():
    """Each bin (i, j) shifted by (dx w, dy h) = RoIAlign (1 x 1 output) of that shifted
    bin, a per-bin loop with torchvision's op as the reference."""
    g = torch.Generator().manual_seed(3)
    feats = torch.randn(2, 3, 12, 15, generator=g, dtype=torch.float64)
    rois = torch.tensor(
        [[0, 4.0, 6.0, 40.0, 30.0], [1, -6.0, 2.0, 20.0, 50.0], [0, 30.0, 20.0, 58.0, 46.0]],
        dtype=torch.float64,
    )
    k, scale, s = 3, 0.25, 2
    offsets = (torch.rand(3, 2, k, k, generator=g, dtype=torch.float64) - 0.5) * 0.6
    ours = deform_roi_align(feats, rois, offsets, (k, k), scale, s)
    ref = torch.empty_like(ours)
    for r in range(3):
        b, x0, y0, x1, y1 = rois[r].tolist()
        bw, bh = (x1 - x0) / k, (y1 - y0) / k
        for i in range(k):
            for j in range(k):
                sx0 = x0 + j * bw + offsets[r, 0, i, j] * (x1 - x0)
                sy0 = y0 + i * bh + offsets[r, 1, i, j] * (y1 - y0)
                box = torch.tensor([[b, sx0, sy0, sx0 + bw, sy0 + bh]], dtype=torch.float64)
                ref[r, :, i, j] = roi_align(feats, box, 1, scale, s, aligned=True)[0, :, 0, 0]
    torch.testing.assert_close(ours, ref, rtol=1e-10, atol=1e-10)


def test_gradients_reach_offsets_and_features():
    g = torch.Generator().manual_seed(4)
    feats = torch.randn(1, 2, 8, 8, generator=g, dtype=torch.float64, requires_grad=True)
    rois = torch.tensor([[0, 3.0, 5.0, 25.0, 20.0]], dtype=torch.float64)
    offsets = (0.2 * torch.rand(1, 2, 2, 2, generator=g, dtype=torch.float64)).requires_grad_()
    assert torch.autograd.gradcheck(
        lambda f, o: deform_roi_align(f, rois, o, (2, 2), 0.25, 2), (feats, offsets)
    )


def test_offset_gradients_with_adaptive_grids_and_borders():
    """Finite differences of the shifted pass with detectron2's adaptive sample grid (1 to 4
    samples per bin axis), bins pushed across the map's border (edge reads, zeros beyond)."""
    g = torch.Generator().manual_seed(5)
    feats = torch.randn(2, 1, 9, 11, generator=g, dtype=torch.float64, requires_grad=True)
    rois = torch.tensor(
        [[0, 2.0, 3.0, 14.0, 9.0], [1, -5.0, -3.0, 30.0, 20.0], [0, 20.0, 15.0, 46.0, 40.0],
         [1, 30.0, 4.0, 43.0, 41.0]],
        dtype=torch.float64,
    )  # fmt: skip
    offsets = (torch.rand(4, 2, 3, 3, generator=g, dtype=torch.float64) - 0.5) * 0.8
    offsets.requires_grad_()
    grid = torch.ceil((rois[:, 3:] - rois[:, 1:3]) * 0.25 / 3)
    assert grid.min() == 1 and grid.max() == 4  # adaptive grids of several sizes
    assert torch.autograd.gradcheck(
        lambda f, o: deform_roi_align(f, rois, o, (3, 3), 0.25, 0), (feats, offsets)
    )


def test_pooler_reads_every_map_in_one_pass_as_map_by_map_calls():
    """The pooler's single pass over all levels and images equals deform_roi_align map by
    map (each level of each image alone) with the pooler's own offsets: values, feature and
    offset-branch gradients."""
    g = torch.Generator().manual_seed(6)
    scales = (1 / 4, 1 / 8, 1 / 16)
    x = [torch.randn(2, 4, int(96 * s), int(128 * s), generator=g, dtype=torch.float64)
         for s in scales]  # fmt: skip
    x = [f.requires_grad_() for f in x]
    boxes = [random_boxes(g, 11, 96), random_boxes(g, 9, 96)]
    boxes = [Boxes(b.tensor.double()) for b in boxes]
    pooler = DeformROIPooler(5, scales, 0, in_channels=4, canonical_box_size=24, fc_dim=8)
    pooler = pooler.double()
    torch.nn.init.normal_(pooler.offset_fc[2].weight, std=0.5, generator=g)
    plain = ROIPooler(5, scales, 0, "ROIAlignV2", canonical_box_size=24)
    levels = assign_boxes_to_levels(boxes, 2, 4, 24, 4)
    assert levels.unique().numel() == 3
    rois = convert_boxes_to_pooler_format(boxes)
    weights = torch.randn(20, 4, 5, 5, generator=g, dtype=torch.float64)
    grads = []
    for one_pass in (True, False):
        if one_pass:
            out = pooler(x, boxes)
        else:
            offsets = pooler.gamma * pooler.offset_fc(plain(x, boxes).flatten(1))
            offsets, out = offsets.view(-1, 2, 5, 5), torch.zeros_like(weights)
            for (level, scale), image in itertools.product(enumerate(scales), range(2)):
                i = (levels == level) & (rois[:, 0] == image)
                one = torch.cat([torch.zeros_like(rois[i, :1]), rois[i, 1:]], dim=1)
                f = x[level][image : image + 1]
                out[i] = deform_roi_align(f, one, offsets[i], (5, 5), scale, 0)
        grads.append(torch.autograd.grad((out * weights).sum(), x + [pooler.offset_fc[2].weight]))
        grads[-1] = (out.detach(),) + grads[-1]
    assert grads[0][0].abs().sum() > 0
    for ours, ref in zip(*grads):
        torch.testing.assert_close(ours, ref, rtol=1e-10, atol=1e-12)


def test_no_roi_keeps_every_parameter_in_the_graph():
    """A mask pooler on a batch without foreground RoIs: an empty output whose backward gives
    the offset branch zero gradients (DDP without find_unused_parameters needs one for
    every parameter on every rank)."""
    x = [torch.randn(1, 4, 16, 16, requires_grad=True), torch.randn(1, 4, 8, 8)]
    pooler = DeformROIPooler(3, (1 / 4, 1 / 8), 0, in_channels=4, fc_dim=8)
    out = pooler(x, [Boxes(torch.zeros((0, 4)))])
    assert out.shape == (0, 4, 3, 3)
    (out.sum() * 0).backward()
    for name, p in pooler.named_parameters():
        assert p.grad is not None and torch.count_nonzero(p.grad) == 0, name


def test_roi_heads_build_and_train_with_deform_pooling(storage):
    cfg = tiny_cfg(
        opts=[
            "MODEL.ROI_BOX_HEAD.POOLER_TYPE",
            "DeformROIAlignV2",
            "MODEL.ROI_MASK_HEAD.POOLER_TYPE",
            "DeformROIAlignV2",
            "MODEL.ROI_BOX_HEAD.DEFORM_POOL.FC_DIM",
            "32",
        ]
    )
    model = build_model(cfg)
    box, mask = model.roi_heads.box_pooler, model.roi_heads.mask_pooler
    assert isinstance(box, DeformROIPooler) and isinstance(mask, DeformROIPooler)
    assert box.canonical_box_size == mask.canonical_box_size == 36
    assert box.offset_fc[0].out_features == 32 and box.gamma == pytest.approx(0.1)
    losses = model(make_batch(num_images=2, size=(64, 64)))
    sum(losses.values()).backward()
    assert box.offset_fc[2].weight.grad.abs().sum() > 0  # the zero-initialised layer learns
    assert mask.offset_fc[2].weight.grad.abs().sum() > 0

    cfg = tiny_cfg(
        opts=[
            "MODEL.ROI_MASK_HEAD.POOLER_TYPE",
            "DeformROIAlignV2",
            "MODEL.ROI_MASK_HEAD.LEVEL_ASSIGNMENT",
            "area_ratio",
        ]
    )
    with pytest.raises(
        ValueError, match="ROI_MASK_HEAD.POOLER_TYPE 'DeformROIAlignV2'.*AreaRatioROIPooler"
    ):
        build_model(cfg)


def test_cascade_heads_get_the_deformable_box_pooler():
    cfg = tiny_cfg(
        opts=[
            "MODEL.ROI_HEADS.NAME", "LongTailCascadeROIHeads",
            "MODEL.ROI_BOX_HEAD.CLS_AGNOSTIC_BBOX_REG", "True",
            "MODEL.ROI_BOX_HEAD.POOLER_TYPE", "DeformROIAlignV2",
        ]
    )  # fmt: skip
    heads = build_model(cfg).roi_heads
    assert isinstance(heads.box_pooler, DeformROIPooler) and len(heads.box_predictor) == 3
    assert type(heads.mask_pooler) is ROIPooler
