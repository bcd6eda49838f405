"""``python -m lvis_longtail.tools.visualize`` with the tiny config and an untrained model."""

import cv2
import numpy as np
from conftest import TINY_BASE
from detectron2.data import MetadataCatalog

from lvis_longtail.tools import visualize


def test_visualize_writes_drawn_images(tmp_path):
    name = "lt_visualize_test"
    classes = [f"shape_{k}" for k in range(5)]
    MetadataCatalog.get(name).set(thing_classes=classes)
    inputs = tmp_path / "images"
    inputs.mkdir()
    rng = np.random.default_rng(0)
    for i in range(2):
        image = rng.integers(0, 255, (96, 128, 3), dtype=np.uint8)
        cv2.rectangle(image, (20, 20), (70, 60), (30, 200, 40), -1)
        cv2.imwrite(str(inputs / f"img{i}.png"), image)
    out = tmp_path / "drawn"
    argv = [
        "--config-file", str(TINY_BASE), "--input", str(inputs), "--output", str(out),
        "--confidence-threshold", "0", "--max-dets", "5",
        "MODEL.ROI_HEADS.NUM_CLASSES", "5", "DATASETS.TEST", f"('{name}',)",
        "DATASETS.TRAIN", "()", "MODEL.RPN.POST_NMS_TOPK_TEST", "20",
    ]  # fmt: skip
    assert visualize.main(argv) == 0
    for i in range(2):
        drawn = cv2.imread(str(out / f"img{i}.png"))
        assert drawn.shape == (96, 128, 3)
    # detections were drawn: the output differs from the input image
    assert np.abs(drawn.astype(int) - cv2.imread(str(inputs / "img1.png")).astype(int)).sum() > 0
    meta = visualize.class_metadata(visualize.setup_cfg(str(TINY_BASE), argv[10:]))
    assert meta.thing_classes == classes


def test_visualize_warns_without_weights_and_upscales(tmp_path, caplog):
    inputs = tmp_path / "small.png"
    cv2.imwrite(str(inputs), np.full((32, 48, 3), 90, dtype=np.uint8))
    out = tmp_path / "drawn"
    argv = [
        "--config-file", str(TINY_BASE), "--input", str(inputs), "--output", str(out),
        "--scale", "3", "MODEL.ROI_HEADS.NUM_CLASSES", "3", "DATASETS.TRAIN", "()",
        "DATASETS.TEST", "()", "MODEL.RPN.POST_NMS_TOPK_TEST", "10",
    ]  # fmt: skip
    with caplog.at_level("WARNING", logger="lvis_longtail.tools.visualize"):
        assert visualize.main(argv) == 0
    assert "No MODEL.WEIGHTS given" in caplog.text
    assert cv2.imread(str(out / "small.png")).shape == (96, 144, 3)
