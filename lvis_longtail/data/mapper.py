"""The training data seam: a ``DatasetMapper`` running ``INPUT.AUGMENTATIONS``.

Dataset-dict keys read, besides detectron2's:

- ``ignore_boxes`` (optional): list of ``[x0, y0, x1, y1]`` boxes (XYXY_ABS, image pixels) of
  regions that are neither foreground nor background (e.g. missing annotations found by
  self-training). They follow every transform exactly as the GT boxes do.
- ``neg_category_ids``, ``not_exhaustive_category_ids`` (LVIS, dataset category ids).

Keys of a mapped training dict, besides detectron2's ``image`` and ``instances``:

- ``ignore_boxes``: :class:`~detectron2.structures.Boxes` ``(M, 4)`` in the augmented image.
- ``pos_category_ids``, ``neg_category_ids``, ``not_exhaustive_category_ids``: sorted int64
  tensors of **contiguous** class ids (0..K-1): classes present, verified negatives and
  not-exhaustively annotated classes of the (possibly combined) image; multi-image steps
  merge them (union of positives, negatives only if negative in every source and not present,
  union of not-exhaustive).
"""

import copy
import logging
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch
from detectron2.config import configurable
from detectron2.data import DatasetMapper, MetadataCatalog
from detectron2.data import detection_utils as utils
from detectron2.data import transforms as T
from detectron2.structures import Boxes, PolygonMasks

from lvis_longtail.data.augmentations import (
    LazySample,
    Sample,
    SampleStep,
    build_augmentation_steps,
    needs_box_recompute,
)
from lvis_longtail.data.augmentations.geometry import polygon_mask_boxes
from lvis_longtail.data.augmentations.sample import (
    boxes_to_polygons,
    contiguous_image,
    ignore_boxes,
    normalize_annotation,
    transform_sample,
)
from lvis_longtail.data.image_io import SkippedImages, UnreadableImageError, read_image
from lvis_longtail.data.image_labels import needs_image_labels, set_neg_classes

logger = logging.getLogger(__name__)

LVIS_LIST_KEYS = ("neg_category_ids", "not_exhaustive_category_ids")


def class_id_map(dataset_name: str) -> Dict[int, int]:
    """Dataset category id -> contiguous id of a training set (LVIS: ``id - 1`` when the
    metadata has no explicit map)."""
    meta = MetadataCatalog.get(dataset_name)
    mapping = meta.get("thing_dataset_id_to_contiguous_id")
    if mapping is None:
        num = len(meta.get("thing_classes") or [])
        mapping = {k + 1: k for k in range(num)}
    return dict(mapping)


class LongTailDatasetMapper(DatasetMapper):
    """detectron2's ``DatasetMapper`` whose training path runs the steps of
    ``INPUT.AUGMENTATIONS`` (see :mod:`lvis_longtail.data.augmentations`) and also maps ignore
    boxes and the LVIS image-level labels (keys: module docstring).

    With the default steps its output equals detectron2's for the same random state. A
    training sample whose augmentation removed every instance maps to None, and the dataset
    wrapper draws another sample; so does one with an unreadable image (file and image id
    in a warning, counted in ``skipped_images``), unless ``skip_unreadable`` is off. Test-time
    mapping is detectron2's, with the image read by the same
    :func:`~lvis_longtail.data.image_io.read_image` (an unreadable image is an error).

    Multi-image steps take their extra images from the records after the first one of
    :meth:`map_group`; ``num_extra_images`` says how many it needs.
    """

    @configurable
    def __init__(
        self,
        is_train: bool = True,
        *,
        augmentations: List,
        class_id_map: Optional[Dict[int, int]] = None,
        neg_classes_on_instances: bool = False,
        skip_unreadable: bool = True,
        num_workers: int = 0,
        **kwargs,
    ):
        """
        Args:
            is_train, kwargs: as detectron2's ``DatasetMapper``.
            augmentations: training: steps (``T.Augmentation`` or ``SampleStep``); test:
                detectron2 augmentations.
            class_id_map: dataset category id -> contiguous id, for the LVIS label fields
                (None: they are not mapped).
            neg_classes_on_instances: also put the image's verified negative classes on its
                GT instances (:func:`~lvis_longtail.data.image_labels.set_neg_classes`), for
                models that read them there (HTC-Lite's federated context loss).
            skip_unreadable: training: map a sample with an unreadable image (any image of
                a multi-image step) to None, so another is drawn; False: raise.
            num_workers: the DataLoader workers that share ``skipped_images``.
        """
        steps = list(augmentations)
        plain = [s for s in steps if not isinstance(s, SampleStep)]
        super().__init__(is_train, augmentations=plain if not is_train else [], **kwargs)
        self.steps = steps
        self.class_id_map = class_id_map
        self.neg_classes_on_instances = neg_classes_on_instances
        self.skip_unreadable = skip_unreadable
        self.skipped_images = SkippedImages(num_workers if is_train else 0)
        self.recompute_boxes = self.recompute_boxes or any(needs_box_recompute(s) for s in steps)
        self.segments = []  # ("augs", AugmentationList) or ("step", SampleStep)
        for s in steps:
            if isinstance(s, SampleStep):
                self.segments.append(("step", s))
            elif self.segments and self.segments[-1][0] == "augs":
                self.segments[-1][1].append(s)
            else:
                self.segments.append(("augs", [s]))
        self.segments = [(k, T.AugmentationList(v) if k == "augs" else v) for k, v in self.segments]
        self.num_extra_images = sum(s.num_extra for k, s in self.segments if k == "step")
        if is_train:
            logger.info(f"[LongTailDatasetMapper] training steps: {steps}")

    @classmethod
    def from_config(cls, cfg, is_train: bool = True):
        ret = super().from_config(cfg, is_train)
        if is_train:
            ret["augmentations"] = build_augmentation_steps(cfg)
            ret["recompute_boxes"] = False  # decided from the steps (and masks) in __init__
            if cfg.DATASETS.TRAIN:
                ret["class_id_map"] = class_id_map(cfg.DATASETS.TRAIN[0])
            ret["neg_classes_on_instances"] = needs_image_labels(cfg)
            ret["skip_unreadable"] = cfg.DATALOADER.SKIP_UNREADABLE_IMAGES
            ret["num_workers"] = cfg.DATALOADER.NUM_WORKERS
        return ret

    def __call__(self, dataset_dict):
        if not self.is_train:
            return self.map_test(dataset_dict)
        return self.map_group([dataset_dict])

    def map_test(self, dataset_dict: dict) -> dict:
        """detectron2's test-time ``DatasetMapper.__call__`` (no semantic segmentation), with
        the image read by :func:`~lvis_longtail.data.image_io.read_image`."""
        record = copy.deepcopy(dataset_dict)
        image = read_image(record["file_name"], self.image_format, record.get("image_id"))
        utils.check_image_size(record, image)
        aug_input = T.AugInput(image)
        transforms = self.augmentations(aug_input)
        image = aug_input.image
        record["image"] = torch.as_tensor(np.ascontiguousarray(image.transpose(2, 0, 1)))
        if self.proposal_topk is not None:
            utils.transform_proposals(
                record, image.shape[:2], transforms, proposal_topk=self.proposal_topk
            )
        record.pop("annotations", None)
        record.pop("sem_seg_file_name", None)
        return record

    # ---------------------------------------------------------------- training path
    def map_group(self, records: Sequence[dict]) -> Optional[dict]:
        """Map ``records[0]``; multi-image steps take their extra images from the rest.

        Returns:
            The mapped dict, or None when the augmentation removed every instance or (with
            ``skip_unreadable``) an image cannot be read.
        """
        try:
            return self._map_group(records)
        except UnreadableImageError as e:
            if not self.skip_unreadable:
                raise
            self.skipped_images.add(str(e))
            logger.warning(f"Skipped a training sample: {e}")
            return None

    def _map_group(self, records: Sequence[dict]) -> Optional[dict]:
        extras = list(records[1:])
        sample = self.load_sample(records[0])
        had_instances = bool(sample.annos)
        for pos, (kind, seg) in enumerate(self.segments):
            if kind == "augs":
                sample = self._apply_augs(sample, seg)
                continue
            mine, extras = extras[: seg.num_extra], extras[seg.num_extra :]
            if len(mine) < seg.num_extra:
                raise ValueError(
                    f"{type(seg).__name__} needs {seg.num_extra} extra images, got {len(mine)}"
                )
            lazies = [LazySample(r, self._loader(r, pos)) for r in mine]
            combined = seg(sample, lazies)
            if combined is not sample:
                had_instances |= any(r.get("annotations") for r in mine)
            sample = combined
        return self._output(records[0], sample, had_instances)

    def _loader(self, record, upto):
        def load():
            sample = self.load_sample(record)
            for kind, seg in self.segments[:upto]:
                if kind == "augs":
                    sample = self._apply_augs(sample, seg)
            return sample

        return load

    @staticmethod
    def _apply_augs(sample: Sample, augs: T.AugmentationList) -> Sample:
        aug_input = T.AugInput(sample.image)
        transforms = augs(aug_input)
        return transform_sample(sample, transforms, image=aug_input.image)

    def _contiguous(self, record, key):
        ids = record.get(key) or []
        if self.class_id_map is None:
            return set()
        try:
            return {self.class_id_map[int(c)] for c in ids}
        except KeyError as e:
            raise ValueError(
                f"image id={record.get('image_id')} ({record.get('file_name')}): field '{key}' "
                f"has category id {e.args[0]}, not a class of the training set"
            ) from None

    def load_sample(self, record: dict) -> Sample:
        """Read a dataset record's image and targets into a :class:`Sample`."""
        image = read_image(record["file_name"], self.image_format, record.get("image_id"))
        utils.check_image_size(record, image)
        hw = image.shape[:2]
        annos = []
        for anno in record.get("annotations", []):
            if anno.get("iscrowd", 0) != 0:
                continue
            anno = dict(anno)  # steps never modify annotation values in place
            if not self.use_instance_mask:
                anno.pop("segmentation", None)
            if not self.use_keypoint:
                anno.pop("keypoints", None)
            annos.append(normalize_annotation(anno, hw))
        ignore = np.asarray(record.get("ignore_boxes", []), np.float32)
        if ignore.size and (ignore.ndim != 2 or ignore.shape[1] != 4):
            raise ValueError(
                f"image id={record.get('image_id')} ({record.get('file_name')}): field "
                f"'ignore_boxes' must be a list of [x0, y0, x1, y1], got shape {ignore.shape}"
            )
        return Sample(
            image=image,
            annos=annos,
            ignore=boxes_to_polygons(ignore),
            pos={int(a["category_id"]) for a in annos},
            neg=self._contiguous(record, "neg_category_ids"),
            not_exhaustive=self._contiguous(record, "not_exhaustive_category_ids"),
        )

    def _output(self, record: dict, sample: Sample, had_instances: bool) -> Optional[dict]:
        out = {k: v for k, v in record.items() if k not in ("annotations", "ignore_boxes")}
        out = copy.deepcopy(out)
        image = sample.image
        hw = image.shape[:2]
        out["image"] = torch.as_tensor(
            np.ascontiguousarray(contiguous_image(image).transpose(2, 0, 1))
        )
        annos = sample.annos
        mask_format = self.instance_mask_format
        if any(isinstance(a.get("segmentation"), np.ndarray) for a in annos):
            mask_format = "bitmask"  # bitmask/RLE data, or a sample rasterised by a step
        instances = utils.annotations_to_instances(annos, hw, mask_format=mask_format)
        if (self.recompute_boxes or sample.recompute_boxes) and instances.has("gt_masks"):
            masks = instances.gt_masks
            if isinstance(masks, PolygonMasks) and all(len(ps) for ps in masks.polygons):
                instances.gt_boxes = Boxes(torch.from_numpy(polygon_mask_boxes(masks.polygons)))
            else:
                instances.gt_boxes = masks.get_bounding_boxes()
            instances.gt_boxes.clip(hw)
        instances = utils.filter_empty_instances(instances)
        if had_instances and len(instances) == 0:
            return None
        out["instances"] = instances
        out["ignore_boxes"] = Boxes(torch.as_tensor(ignore_boxes(sample), dtype=torch.float32))
        for key, ids in (
            ("pos_category_ids", sample.pos),
            ("neg_category_ids", sample.neg),
            ("not_exhaustive_category_ids", sample.not_exhaustive),
        ):
            out[key] = torch.as_tensor(sorted(ids), dtype=torch.int64)
        if self.neg_classes_on_instances:
            set_neg_classes(instances, out["neg_category_ids"].tolist())
        return out
