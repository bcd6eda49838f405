"""Balanced Group Softmax (Li et al., "Overcoming Classifier Imbalance for Long-tail Object
Detection with Balanced Group Softmax", CVPR 2020). References: FishYuLi/BalancedGroupSoftmax
``mmdet/models/bbox_heads/gs_bbox_head_with0.py``, tztztztztz/eqlv2
``mmdet/models/losses/group_softmax.py``.

Logit layout (L = K + 1 + number of groups): group 0 ``[background, foreground]``, then for
each non-empty instance-count bin n >= 1 ``[others, its classes in class-id order]``.
"""

from typing import Dict, List, Optional, Sequence, Tuple

import torch
from detectron2.config import configurable
from torch.nn import functional as F

from lvis_longtail.data.class_stats import get_class_stats

from .base import ClassificationLoss, empty_loss
from .registry import CLS_LOSS_REGISTRY


def assign_groups(instance_count: torch.Tensor, bin_edges: Sequence[float]) -> torch.Tensor:
    """Group of each class from its training instance count: bins [0, e0), [e0, e1), ...,
    [e_last, inf); empty bins are dropped, the remaining ones numbered 1, 2, ... in order.

    Args:
        instance_count: (K,) training instances per class.

    Returns:
        (K,) int64 group ids >= 1 (group 0 is the background group).
    """
    edges = torch.as_tensor(list(bin_edges), dtype=torch.float64)
    bins = torch.bucketize(instance_count.to(torch.float64), edges, right=True)
    _, group = torch.unique(bins, sorted=True, return_inverse=True)
    return group + 1


def sample_group_rows(
    in_group: torch.Tensor, others_ratio: float, generator: Optional[torch.Generator] = None
) -> torch.Tensor:
    """RoIs that a group's loss uses: all its positives, plus int(others_ratio * #positives)
    "others" RoIs drawn uniformly without replacement (all of them if there are fewer).

    Args:
        in_group: (R,) bool, the RoI's label belongs to the group.

    Returns:
        (M,) int64 row indices; empty when the group has no positive RoI.
    """
    positives = in_group.nonzero().squeeze(1)
    if positives.numel() == 0:
        return positives
    others = (~in_group).nonzero().squeeze(1)
    num_others = min(int(others_ratio * positives.numel()), others.numel())
    order = torch.randperm(others.numel(), device=others.device, generator=generator)
    return torch.cat([positives, others[order[:num_others]]])


def group_softmax_loss(
    logits: torch.Tensor,
    gt_classes: torch.Tensor,
    group_slices: Sequence[Tuple[int, int]],
    label_maps: torch.Tensor,
    class_group: torch.Tensor,
    others_ratio: float = 8.0,
    generator: Optional[torch.Generator] = None,
) -> torch.Tensor:
    """Sum over groups of the mean softmax CE of the group's sampled RoIs.

    Args:
        logits: (R, L) logits in the layout described in the module docstring.
        gt_classes: (R,) labels in [0, K].
        group_slices: G (start, stop) column ranges, group 0 first.
        label_maps: (G, K+1) label of each detectron2 label inside each group (0 = "others"
            in groups n >= 1, 0 = background / 1 = foreground in group 0).
        class_group: (K+1,) group id of each label (background: 0).
        others_ratio: beta, "others" RoIs per positive RoI of a group n >= 1.

    Returns:
        fp32 scalar; group 0 uses every RoI, a group without positives contributes 0.
    """
    if gt_classes.numel() == 0:
        return empty_loss(logits)
    sizes = [stop - start for start, stop in group_slices]
    background_logits, *group_logits = logits.float().split(sizes, dim=1)
    loss = F.cross_entropy(background_logits, label_maps[0][gt_classes])  # all RoIs
    row_group = class_group[gt_classes]
    for group, logits_g in enumerate(group_logits, start=1):
        rows = sample_group_rows(row_group == group, others_ratio, generator)
        labels = label_maps[group][gt_classes[rows]]
        group_loss = F.cross_entropy(logits_g.index_select(0, rows), labels, reduction="sum")
        loss = loss + group_loss / max(rows.numel(), 1)
    return loss


def group_softmax_probs(
    logits: torch.Tensor, group_slices: Sequence[Tuple[int, int]], class_columns: torch.Tensor
) -> torch.Tensor:
    """p(c) = p_G0(foreground) p_Gn(c) for c in group n; background column p_G0(background).

    Args:
        logits: (R, L) logits.
        class_columns: (K,) column of each class in the layout.

    Returns:
        (R, K+1) fp32 probabilities.
    """
    sizes = [stop - start for start, stop in group_slices]
    probs = torch.cat([F.softmax(z, dim=1) for z in logits.float().split(sizes, dim=1)], dim=1)
    background, foreground = probs[:, 0:1], probs[:, 1:2]
    return torch.cat([probs[:, class_columns] * foreground, background], dim=1)


@CLS_LOSS_REGISTRY.register()
class GroupSoftmax(ClassificationLoss):
    """Balanced Group Softmax: one softmax per group of classes with similar training instance
    counts (``GROUP_SOFTMAX.BIN_EDGES``), each with an "others" entry, plus a background/
    foreground group over all RoIs. "Others" RoIs of a group are subsampled at
    ``OTHERS_SAMPLE_RATIO`` per positive (with torch's RNG; under DDP each rank samples its own
    RoIs). Accuracy: argmax of the final K+1 probabilities.

    The paper's recipe is decoupled: fine-tune a re-initialised classifier of a trained model
    with everything else frozen (see ``configs/*/*bags*.yaml``).
    """

    @configurable
    def __init__(
        self,
        num_classes: int,
        *,
        instance_count: torch.Tensor,
        bin_edges: Sequence[float] = (10, 100, 1000),
        others_sample_ratio: float = 8.0,
    ):
        """
        Args:
            num_classes: K.
            instance_count: (K,) training instances per class.
            bin_edges: increasing instance-count edges of the groups.
            others_sample_ratio: beta.
        """
        super().__init__(num_classes)
        if instance_count.numel() != num_classes:
            raise ValueError(
                f"instance_count has {instance_count.numel()} classes, not {num_classes}"
            )
        self.bin_edges = list(bin_edges)
        self.others_sample_ratio = others_sample_ratio
        class_group = assign_groups(instance_count, bin_edges)
        self.group_slices, label_maps, class_columns = self._layout(class_group)
        full_group = torch.cat([class_group, class_group.new_zeros(1)])
        self.register_buffer("class_group", full_group, persistent=False)
        self.register_buffer("label_maps", label_maps, persistent=False)
        self.register_buffer("class_columns", class_columns, persistent=False)

    def _layout(
        self, class_group: torch.Tensor
    ) -> Tuple[List[Tuple[int, int]], torch.Tensor, torch.Tensor]:
        """Column ranges of the groups, per-group label maps (G, K+1), class columns (K,)."""
        num_groups = int(class_group.max()) + 1
        label_maps = torch.zeros(num_groups, self.num_classes + 1, dtype=torch.long)
        label_maps[0, : self.num_classes] = 1  # group 0: background 0, foreground 1
        class_columns = torch.zeros(self.num_classes, dtype=torch.long)
        slices, start = [(0, 2)], 2
        for group in range(1, num_groups):
            members = (class_group == group).nonzero().squeeze(1)
            label_maps[group, members] = torch.arange(1, members.numel() + 1)
            class_columns[members] = torch.arange(start + 1, start + 1 + members.numel())
            slices.append((start, start + 1 + members.numel()))
            start += 1 + members.numel()
        return slices, label_maps, class_columns

    @classmethod
    def from_config(cls, cfg, num_classes):
        gs = cfg.MODEL.ROI_BOX_HEAD.GROUP_SOFTMAX
        return {
            "num_classes": num_classes,
            "instance_count": get_class_stats(cfg.DATASETS.TRAIN).instance_count,
            "bin_edges": gs.BIN_EDGES,
            "others_sample_ratio": gs.OTHERS_SAMPLE_RATIO,
        }

    @property
    def num_groups(self) -> int:
        """Number of groups, background group included."""
        return len(self.group_slices)

    @property
    def num_logits(self) -> int:
        return self.num_classes + 1 + self.num_groups

    def forward(self, logits: torch.Tensor, gt_classes: torch.Tensor) -> Dict[str, torch.Tensor]:
        loss = group_softmax_loss(
            logits,
            gt_classes,
            self.group_slices,
            self.label_maps,
            self.class_group,
            self.others_sample_ratio,
        )
        return {"loss_cls": loss}

    def predict_probs(self, logits: torch.Tensor) -> torch.Tensor:
        return group_softmax_probs(logits, self.group_slices, self.class_columns)

    def class_logit_columns(self) -> torch.Tensor:
        """Each class's column in its group; "others" and the background group untouched."""
        return self.class_columns.clone()

    def extra_repr(self) -> str:
        sizes = [b - a - 1 for a, b in self.group_slices[1:]]
        return f"{super().extra_repr()}, bin_edges={self.bin_edges}, classes_per_group={sizes}"
