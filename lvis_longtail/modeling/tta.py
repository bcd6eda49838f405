"""Test-time augmentation for lvis_longtail's models (``TEST.AUG``; see docs/tta.md).

:class:`LongTailTTA` is detectron2's ``GeneralizedRCNNWithTTA`` (resize to several scales,
optionally flip, detect, merge, then predict masks of the merged boxes at every
augmentation) with the four changes of the LVIS 2020 1st-place entry, each off by default:

1. per-scale valid box ranges: a detection of scale s is kept only if its sqrt(w h), in the
   pixels of that scale's image (before the inverse transform), is in ``VALID_RANGES[s]``;
2. rare (and common) score factors on the union of the augmentations' detections;
3. the merge: per-class hard NMS at ``NMS_THRESH``, then optionally Soft-NMS;
4. the mask rule "select": each instance's mask (and Mask Scoring's ``mask_scores``) is the
   mean over the augmentations of the scales whose valid range contains its sqrt(w h r).

Scales are explicit (short side, max size) pairs. Mask memory is bounded: the mask head sees
at most ``MASK_CHUNK_SIZE`` boxes of one augmented image per call, and its class-specific
(chunk, K, M, M) logits are reduced to the predicted class inside that call; what is kept is
(augmentations, detections, M, M). With every new option off the output equals
``GeneralizedRCNNWithTTA`` on the same model (tests/test_tta.py).
"""

import copy
from contextlib import contextmanager
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from detectron2.data import MetadataCatalog
from detectron2.layers import batched_nms
from detectron2.modeling import GeneralizedRCNN
from detectron2.modeling.postprocessing import detector_postprocess
from detectron2.modeling.test_time_augmentation import DatasetMapperTTA
from detectron2.structures import Boxes, Instances
from fvcore.transforms import HFlipTransform
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from lvis_longtail.data.class_stats import training_frequency
from lvis_longtail.data.image_io import read_image
from lvis_longtail.modeling.mask_levels import MIN_AREA_RATIO
from lvis_longtail.modeling.postprocessing import SoftNMSParams, batched_soft_nms

__all__ = ["LongTailTTA", "class_score_factors", "in_valid_range", "select_weights"]


def in_valid_range(boxes: torch.Tensor, valid_range: Optional[Sequence[float]]) -> torch.Tensor:
    """(N,) bool: sqrt(w h) of (N, 4) boxes within [lo, hi] (hi < 0: no upper bound)."""
    if valid_range is None:
        return torch.ones(len(boxes), dtype=torch.bool, device=boxes.device)
    lo, hi = valid_range
    size = Boxes(boxes).area().clamp(min=0).sqrt()
    keep = size >= lo
    return keep & (size <= hi) if hi >= 0 else keep


def class_score_factors(frequency: Sequence[str], rare: float, common: float) -> torch.Tensor:
    """(K,) score factor of each class: ``rare`` for "r", ``common`` for "c", 1 for "f"."""
    table = {"r": rare, "c": common, "f": 1.0}
    try:
        return torch.tensor([table[f] for f in frequency], dtype=torch.float32)
    except KeyError as e:
        raise ValueError(f"class_frequency holds {e.args[0]!r}, not one of r, c, f") from None


def select_weights(
    masks: torch.Tensor,
    boxes: torch.Tensor,
    aug_scale: torch.Tensor,
    scale_factor: torch.Tensor,
    valid_ranges: torch.Tensor,
) -> torch.Tensor:
    """(A, R) weights of the "select" mask rule.

    Args:
        masks: (A, R, M, M) mask probabilities of R instances at A augmentations.
        boxes: (R, 4) instance boxes in original-image pixels.
        aug_scale: (A,) int64 scale index of each augmentation.
        scale_factor: (S,) resize factor (scale pixels / original pixels) of each scale.
        valid_ranges: (S, 2) [lo, hi] per scale in its pixels (hi < 0: no upper bound).

    Returns:
        1 for the augmentations of the scales whose range contains sqrt(w h r) (r = fraction
        of the mean mask above 0.5, clamped to [MIN_AREA_RATIO, 1]), else 0; a row with no
        such scale is all 1 (the mean).
    """
    ratio = (masks.mean(0) > 0.5).flatten(1).float().mean(1).clamp(MIN_AREA_RATIO, 1.0)
    size = (Boxes(boxes).area().clamp(min=0) * ratio).sqrt()  # (R,) original pixels
    size = size[None, :] * scale_factor[:, None].to(size)  # (S, R) in each scale's pixels
    lo, hi = valid_ranges[:, :1].to(size), valid_ranges[:, 1:].to(size)
    inside = (size >= lo) & ((size <= hi) | (hi < 0))  # (S, R)
    weights = inside[aug_scale].float()  # (A, R)
    return torch.where(weights.sum(0, keepdim=True) > 0, weights, torch.ones_like(weights))


class LongTailTTA(nn.Module):
    """A GeneralizedRCNN with lvis_longtail's test-time augmentation; same call interface as
    ``GeneralizedRCNN.forward`` at inference."""

    def __init__(self, cfg, model: nn.Module):
        """
        Args:
            cfg: the config (``TEST.AUG``, ``TEST.DETECTIONS_PER_IMAGE``, ``DATASETS.TRAIN``).
            model: a GeneralizedRCNN (DDP-wrapped or not).
        """
        super().__init__()
        if isinstance(model, DistributedDataParallel):
            model = model.module
        if not isinstance(model, GeneralizedRCNN):
            raise TypeError(f"TEST.AUG needs a GeneralizedRCNN, got {type(model).__name__}")
        aug = cfg.TEST.AUG
        self.model = model
        self.scales: List[Tuple[int, int]] = [(int(s), int(m)) for s, m in aug.SCALES] or [
            (int(s), int(aug.MAX_SIZE)) for s in aug.MIN_SIZES
        ]
        self.mappers = [DatasetMapperTTA([s], m, aug.FLIP) for s, m in self.scales]
        # one range per scale, and MASK_RULE "select" with ranges: lvis_longtail.config_check
        self.valid_ranges = [(float(lo), float(hi)) for lo, hi in aug.VALID_RANGES] or None
        self.class_factors = None
        if aug.RARE_SCORE_FACTOR != 1.0 or aug.COMMON_SCORE_FACTOR != 1.0:
            name = cfg.DATASETS.TRAIN[0] if cfg.DATASETS.TRAIN else None
            # metadata already known, else the json's 'frequency' fields (no annotation read)
            frequency = MetadataCatalog.get(name).as_dict().get("class_frequency") if name else None
            if frequency is None:
                frequency, source = training_frequency(tuple(cfg.DATASETS.TRAIN[:1]))
            if frequency is None:
                raise ValueError(
                    "TEST.AUG.RARE_SCORE_FACTOR / COMMON_SCORE_FACTOR need the frequency groups "
                    f"of DATASETS.TRAIN[0] ({tuple(cfg.DATASETS.TRAIN)}): {source}"
                )
            self.class_factors = class_score_factors(
                frequency, aug.RARE_SCORE_FACTOR, aug.COMMON_SCORE_FACTOR
            )
        nms = aug.NMS_THRESH
        self.nms_thresh = nms if nms >= 0 else cfg.MODEL.ROI_HEADS.NMS_THRESH_TEST
        self.soft_nms = None
        if aug.MERGE_NMS_TYPE != "hard":
            method = aug.MERGE_NMS_TYPE[len("soft_") :]
            self.soft_nms = SoftNMSParams.from_config(aug.SOFT_NMS, method)
        self.mask_rule = aug.MASK_RULE
        self.mask_chunk = max(1, int(aug.MASK_CHUNK_SIZE))
        self.batch_size = max(1, int(aug.BATCH_SIZE))
        self.topk = cfg.TEST.DETECTIONS_PER_IMAGE
        self.mask_on = cfg.MODEL.MASK_ON
        self.mask_side = 2 * cfg.MODEL.ROI_MASK_HEAD.POOLER_RESOLUTION

    @contextmanager
    def _masks_off(self):
        heads = self.model.roi_heads
        old = {a: getattr(heads, a) for a in ("mask_on", "keypoint_on") if hasattr(heads, a)}
        for attr in old:
            setattr(heads, attr, False)
        try:
            yield
        finally:
            for attr, value in old.items():
                setattr(heads, attr, value)

    def _augment(self, inputs: dict):
        """Augmented dataset dicts, their TransformLists and (A,) scale index per augmentation
        (order: scale 0, scale 0 flipped, scale 1, ...: detectron2's)."""
        augmented, tfms, scale_ids = [], [], []
        for s, mapper in enumerate(self.mappers):
            for x in mapper(inputs):
                tfms.append(x.pop("transforms"))
                augmented.append(x)
                scale_ids.append(s)
        return augmented, tfms, torch.tensor(scale_ids, dtype=torch.int64)

    def _batches(self, augmented: List[dict]):
        for i in range(0, len(augmented), self.batch_size):
            yield i, augmented[i : i + self.batch_size]

    def augmented_detections(
        self, augmented: List[dict], tfms, scale_ids: torch.Tensor
    ) -> Dict[str, torch.Tensor]:
        """Detect on every augmented image (masks off), keep each scale's valid range (in its
        pixels), map boxes back to the input image. Returns flat tensors "boxes" (N, 4),
        "scores", "classes", "aug" and "row" (the detection's augmentation and its row in
        that augmentation's output)."""
        outputs = []
        with self._masks_off():
            for _, batch in self._batches(augmented):
                outputs.extend(self.model.inference(batch, do_postprocess=False))
        parts = {k: [] for k in ("boxes", "scores", "classes", "aug", "row")}
        for a, (out, tfm) in enumerate(zip(outputs, tfms)):
            boxes = out.pred_boxes.tensor
            rows = torch.arange(len(out), device=boxes.device)
            if self.valid_ranges is not None:
                rows = rows[in_valid_range(boxes, self.valid_ranges[int(scale_ids[a])])]
            inv = tfm.inverse().apply_box(boxes[rows].cpu().numpy())
            parts["boxes"].append(torch.from_numpy(inv).to(boxes))
            parts["scores"].append(out.scores[rows])
            parts["classes"].append(out.pred_classes[rows])
            parts["aug"].append(torch.full_like(rows, a))
            parts["row"].append(rows)
        return {k: torch.cat(v) for k, v in parts.items()}

    def merge(
        self, dets: Dict[str, torch.Tensor], shape_hw: Tuple[int, int]
    ) -> Tuple[Instances, torch.Tensor]:
        """Merge the detections of :meth:`augmented_detections` in the original image:
        class factors, clip, score > 1e-8, per-class hard NMS, optional Soft-NMS, top-k.
        Returns the merged Instances and (M,) index of each into ``dets``."""
        boxes, scores, classes = dets["boxes"], dets["scores"], dets["classes"]
        if self.class_factors is not None:
            scores = scores * self.class_factors.to(scores)[classes]
        index = torch.arange(len(boxes), device=boxes.device)
        valid = torch.isfinite(boxes).all(dim=1) & torch.isfinite(scores)
        boxes = Boxes(boxes[valid])
        boxes.clip(shape_hw)
        boxes, scores, classes, index = boxes.tensor, scores[valid], classes[valid], index[valid]
        above = scores > 1e-8
        boxes, scores, classes, index = boxes[above], scores[above], classes[above], index[above]
        keep = batched_nms(boxes, scores, classes, self.nms_thresh)
        scores = scores[keep]
        if self.soft_nms is not None:
            kept, scores = batched_soft_nms(boxes[keep], scores, classes[keep], self.soft_nms)
            keep = keep[kept]
        if self.topk >= 0:
            keep, scores = keep[: self.topk], scores[: self.topk]
        merged = Instances(shape_hw)
        merged.pred_boxes = Boxes(boxes[keep])
        merged.scores = scores
        merged.pred_classes = classes[keep]
        return merged, index[keep]

    def augmented_masks(self, augmented: List[dict], tfms, merged: Instances):
        """(A, R, M, M) mask probabilities of the merged instances at every augmentation
        (flips undone) and (A, R) ``mask_scores`` (None without Mask Scoring)."""
        masks, mask_scores = [], []
        boxes = merged.pred_boxes.tensor.cpu().numpy()
        for start, batch in self._batches(augmented):
            images = self.model.preprocess_image(batch)
            features = self.model.backbone(images.tensor)
            for i, x in enumerate(batch):
                tfm = tfms[start + i]
                feats = {k: v[i : i + 1] for k, v in features.items()}
                aug_boxes = torch.from_numpy(tfm.apply_box(boxes)).to(self.model.device)
                chunks, chunk_scores = [], []
                for c in range(0, len(merged), self.mask_chunk):
                    sl = slice(c, c + self.mask_chunk)
                    inst = Instances(
                        tuple(x["image"].shape[1:3]),
                        pred_boxes=Boxes(aug_boxes[sl]),
                        pred_classes=merged.pred_classes[sl],
                        scores=merged.scores[sl],
                    )
                    out = self.model.roi_heads.forward_with_given_boxes(feats, [inst])[0]
                    chunks.append(out.pred_masks[:, 0])
                    if out.has("mask_scores"):
                        chunk_scores.append(out.mask_scores)
                m = torch.cat(chunks)
                if any(isinstance(t, HFlipTransform) for t in tfm.transforms):
                    m = m.flip(dims=[2])
                masks.append(m)
                if chunk_scores:
                    mask_scores.append(torch.cat(chunk_scores))
        return torch.stack(masks), (torch.stack(mask_scores) if mask_scores else None)

    def reduce_masks(self, masks, mask_scores, merged: Instances, scale_ids, factors):
        """(R, 1, M, M) masks and (R,) mask scores (or None) by ``MASK_RULE``."""
        if self.mask_rule == "mean":
            return masks.mean(dim=0)[:, None], (
                None if mask_scores is None else mask_scores.mean(dim=0)
            )
        ranges = torch.tensor(self.valid_ranges, dtype=torch.float32)
        weights = select_weights(masks, merged.pred_boxes.tensor, scale_ids, factors, ranges)
        weights = weights.to(masks)
        total = weights.sum(0)
        mask = (weights[:, :, None, None] * masks).sum(0) / total[:, None, None]
        scores = None if mask_scores is None else (weights * mask_scores).sum(0) / total
        return mask[:, None], scores

    def _inference_one_image(self, inputs: dict) -> dict:
        orig_shape = (inputs["height"], inputs["width"])
        augmented, tfms, scale_ids = self._augment(inputs)
        dets = self.augmented_detections(augmented, tfms, scale_ids)
        merged, _ = self.merge(dets, orig_shape)
        if not self.mask_on:
            return {"instances": merged}
        if len(merged) == 0:
            merged.pred_masks = merged.scores.new_zeros((0, 1, self.mask_side, self.mask_side))
            if getattr(self.model.roi_heads, "mask_iou_head", None) is not None:
                merged.mask_scores = merged.scores.clone()
        else:
            factors = self._scale_factors(augmented, scale_ids, orig_shape)
            masks, mask_scores = self.augmented_masks(augmented, tfms, merged)
            del augmented
            merged.pred_masks, mask_scores = self.reduce_masks(
                masks, mask_scores, merged, scale_ids, factors
            )
            if mask_scores is not None:
                merged.mask_scores = mask_scores
        return {"instances": detector_postprocess(merged, *orig_shape)}

    def _scale_factors(self, augmented, scale_ids, orig_shape) -> torch.Tensor:
        """(S,) resize factor sqrt(h_s w_s / (H W)) of each scale's image to the original."""
        factors = torch.ones(len(self.scales))
        for x, s in zip(augmented, scale_ids.tolist()):
            h, w = x["image"].shape[1:3]
            factors[s] = float(np.sqrt(h * w / (orig_shape[0] * orig_shape[1])))
        return factors

    def forward(self, batched_inputs: List[dict]) -> List[dict]:
        """Same input and output format as ``GeneralizedRCNN.forward`` at inference."""
        return [self._inference_one_image(self._read(x)) for x in batched_inputs]

    def _read(self, dataset_dict: dict) -> dict:
        ret = copy.copy(dataset_dict)
        if "image" not in ret:
            image = read_image(ret.pop("file_name"), self.model.input_format, ret.get("image_id"))
            ret["image"] = torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1)))
        if "height" not in ret and "width" not in ret:
            ret["height"], ret["width"] = ret["image"].shape[1:3]
        return ret
