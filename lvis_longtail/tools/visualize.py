"""Draw a model's masks, boxes and class names on images.

    python -m lvis_longtail.tools.visualize --config-file F --input IMG_OR_DIR --output DIR \\
        [--confidence-threshold 0.5] [--max-dets 100] [--scale 1] \\
        [MODEL.WEIGHTS model_final.pth ...]

Runs detectron2's ``DefaultPredictor`` (``MODEL.WEIGHTS``, test-time resize of the config) on
each image (a file, or every .jpg/.jpeg/.png/.bmp in a folder) and draws the detections above
the threshold with detectron2's ``Visualizer``, writing ``DIR/<image name>.png``. Class names
come from the metadata of ``DATASETS.TEST[0]``, else ``DATASETS.TRAIN[0]``, else "class k".
``--scale`` enlarges the drawing (e.g. 4 for the 128 px synthetic images, whose labels are
unreadable at 1). Without ``MODEL.WEIGHTS`` the model is randomly initialised: a warning says
so (its detections are noise).
"""

# isort: off
import lvis_longtail  # noqa: F401  (first: compat layer, registries, datasets)

# isort: on
import argparse
import logging
import os
import sys
from typing import List, Optional

import cv2
from detectron2.data import MetadataCatalog
from detectron2.data.catalog import Metadata
from detectron2.engine import DefaultPredictor
from detectron2.utils.visualizer import ColorMode, Visualizer

from lvis_longtail.data.image_io import read_image
from lvis_longtail.engine import setup_cfg

logger = logging.getLogger(__name__)
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp")


def image_paths(path: str) -> List[str]:
    """The image itself, or the images of a folder (sorted)."""
    if os.path.isdir(path):
        names = sorted(n for n in os.listdir(path) if n.lower().endswith(IMAGE_EXTENSIONS))
        if not names:
            raise FileNotFoundError(f"{path}: no {'/'.join(IMAGE_EXTENSIONS)} images")
        return [os.path.join(path, n) for n in names]
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such image or folder")
    return [path]


def class_metadata(cfg) -> Metadata:
    """Metadata whose ``thing_classes`` match ``MODEL.ROI_HEADS.NUM_CLASSES``."""
    num_classes = cfg.MODEL.ROI_HEADS.NUM_CLASSES
    for name in list(cfg.DATASETS.TEST[:1]) + list(cfg.DATASETS.TRAIN[:1]):
        meta = MetadataCatalog.get(name)
        try:  # LVIS-format metadata is derived from the json on first access
            classes = meta.get("thing_classes")
        except (OSError, ValueError) as e:
            logger.warning(f"No class names from dataset '{name}': {e}")
            continue
        if classes is not None and len(classes) == num_classes:
            return meta
    logger.warning("No dataset metadata with matching class names; drawing 'class k'.")
    return Metadata(name="__visualize", thing_classes=[f"class {k}" for k in range(num_classes)])


def draw(predictor, metadata, path: str, threshold: float, max_dets: int, scale: float = 1.0):
    """RGB image (round(H * scale), round(W * scale), 3) with the detections of ``path``
    drawn, and their number."""
    image = read_image(path, "BGR")
    instances = predictor(image)["instances"].to("cpu")
    instances = instances[instances.scores >= threshold][:max_dets]
    visualizer = Visualizer(
        image[:, :, ::-1], metadata=metadata, scale=scale, instance_mode=ColorMode.IMAGE
    )
    return visualizer.draw_instance_predictions(instances).get_image(), len(instances)


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config-file", required=True, metavar="FILE")
    parser.add_argument("--input", required=True, help="an image or a folder of images")
    parser.add_argument("--output", required=True, help="folder for the drawn images")
    parser.add_argument("--confidence-threshold", type=float, default=0.5)
    parser.add_argument("--max-dets", type=int, default=100, help="most detections drawn")
    parser.add_argument("--scale", type=float, default=1.0, help="upscale factor of the drawing")
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="config options, KEY VALUE ...")
    args = parser.parse_args(argv)
    if args.scale <= 0:
        parser.error(f"--scale must be positive, got {args.scale}")
    cfg = setup_cfg(args.config_file, args.opts)
    if not cfg.MODEL.WEIGHTS:
        logger.warning(
            "No MODEL.WEIGHTS given: drawing the detections of a randomly initialised model. "
            "Pass e.g. MODEL.WEIGHTS output/tiny/mask_rcnn_R18_FPN_GN/model_final.pth"
        )
    paths = image_paths(args.input)
    predictor = DefaultPredictor(cfg)
    metadata = class_metadata(cfg)
    os.makedirs(args.output, exist_ok=True)
    for path in paths:
        drawn, count = draw(
            predictor, metadata, path, args.confidence_threshold, args.max_dets, args.scale
        )
        out = os.path.join(args.output, os.path.splitext(os.path.basename(path))[0] + ".png")
        if not cv2.imwrite(out, drawn[:, :, ::-1]):
            raise OSError(f"could not write {out}")
        print(f"{path}: {count} detections -> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
