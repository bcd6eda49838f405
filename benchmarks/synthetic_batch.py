"""Training inputs as detectron2's mapper produces them, drawn at random: images with 1 to
``max_instances`` rectangular instances each. One generator for the tests (``tests/conftest.py``
re-exports :func:`make_batch`) and the benchmark scripts (run from this folder)."""

# isort: off
import lvis_longtail  # noqa: F401  (first: the compat layer must precede detectron2)

# isort: on
import numpy as np
import torch
from detectron2.structures import BitMasks, Boxes, Instances


def integer_boxes(g: torch.Generator, n: int, h: int, w: int) -> torch.Tensor:
    """(n, 4) XYXY boxes with integer corners: the top left in the image's first half, sides
    from 12 pixels to half the image."""
    x0 = torch.randint(0, w // 2, (n,), generator=g).float()
    y0 = torch.randint(0, h // 2, (n,), generator=g).float()
    bw = torch.randint(12, w // 2, (n,), generator=g).float()
    bh = torch.randint(12, h // 2, (n,), generator=g).float()
    return torch.stack([x0, y0, x0 + bw, y0 + bh], dim=1)


def make_batch(num_images=2, num_classes=8, size=(96, 128), seed=0, max_instances=3,
               boxes=integer_boxes, device="cpu"):  # fmt: skip
    """``num_images`` dicts of a random (3, h, w) float image and its Instances: 1 to
    ``max_instances`` boxes drawn by ``boxes(generator, n, h, w)``, random classes and the
    boxes' rectangles as masks; the image on ``device``. Deterministic in ``seed``."""
    g = torch.Generator().manual_seed(seed)
    h, w = size
    batch = []
    for _ in range(num_images):
        n = int(torch.randint(1, max_instances + 1, (1,), generator=g))
        xyxy = boxes(g, n, h, w)
        masks = np.zeros((n, h, w), dtype=bool)
        for i, (a, b, c, d) in enumerate(xyxy.round().int().tolist()):
            masks[i, b:d, a:c] = True
        inst = Instances((h, w))
        inst.gt_boxes = Boxes(xyxy)
        inst.gt_classes = torch.randint(0, num_classes, (n,), generator=g)
        inst.gt_masks = BitMasks(torch.from_numpy(masks))
        image = torch.randint(0, 256, (3, h, w), generator=g).float()
        batch.append({"image": image.to(device), "instances": inst, "height": h, "width": w})
    return batch
