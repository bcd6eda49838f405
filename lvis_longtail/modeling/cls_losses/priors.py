"""Class-count priors shared by the frequency-aware losses and the post-hoc calibrations.

Counts always come from the training set's metadata (:func:`get_class_stats` over
``DATASETS.TRAIN``); a class with no training sample counts as 1, so every log is finite.
"""

import torch

from lvis_longtail.config_check import COUNT_SOURCES  # the ``COUNT`` keys' values
from lvis_longtail.data.class_stats import get_class_stats


def training_class_counts(cfg, source: str = "image") -> torch.Tensor:
    """(K,) float64 training count of each class: images containing it ("image") or its
    instances ("instance"), summed over ``cfg.DATASETS.TRAIN``.

    Raises:
        ValueError: ``source`` is not one of :data:`COUNT_SOURCES`.
        KeyError: a training dataset has no class statistics.
    """
    if source not in COUNT_SOURCES:
        raise ValueError(f"count source '{source}' is not one of: {', '.join(COUNT_SOURCES)}")
    stats = get_class_stats(cfg.DATASETS.TRAIN)
    return stats.image_count if source == "image" else stats.instance_count


def log_counts(counts: torch.Tensor) -> torch.Tensor:
    """(K,) float64 log max(n_c, 1)."""
    return torch.as_tensor(counts, dtype=torch.float64).clamp(min=1).log()


def centered_log_prior(counts: torch.Tensor) -> torch.Tensor:
    """(K,) float64 log(K pi_c), pi_c = n_c / sum_j n_j (counts clamped to >= 1): the log prior
    relative to the uniform prior 1/K, so it is 0 for every class when the counts are equal.

    Used as the foreground offsets of logit adjustment; the background logit gets offset 0,
    i.e. background is given the mean foreground count.
    """
    n = torch.as_tensor(counts, dtype=torch.float64).clamp(min=1)
    return (n * n.numel() / n.sum()).log()
