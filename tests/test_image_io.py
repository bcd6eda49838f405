"""One image reader for training and testing: every kind of file (EXIF, 16-bit, greyscale,
RGBA, palette, CMYK) gives the same pixels through the training mapper, the test loader and
both of the reader's decoders; a truncated or undecodable image is an error naming the file
and the image id (skipped and counted in training unless DATALOADER.SKIP_UNREADABLE_IMAGES
is off), never an image with grey fill."""

import logging
import re
from pathlib import Path

import cv2
import numpy as np
import pytest
from augment_helpers import aug_cfg, rect, write_record
from detectron2.data import DatasetCatalog
from detectron2.data.detection_utils import read_image as d2_read_image
from PIL import Image, ImageFile

from lvis_longtail.data.image_io import UnreadableImageError, _decode_with_pil, read_image
from lvis_longtail.data.mapper import LongTailDatasetMapper
from lvis_longtail.engine import Trainer

PACKAGE = Path(__file__).resolve().parents[1] / "lvis_longtail"
H, W = 24, 40


def rgb_array(seed=0):
    """A smooth (H, W, 3) uint8 image: JPEG keeps it well."""
    coarse = np.random.default_rng(seed).integers(0, 256, (4, 5, 3), dtype=np.uint8)
    return np.asarray(Image.fromarray(coarse).resize((W, H), Image.BICUBIC))


def write_kind(folder, kind) -> str:
    """A file of ``kind``; returns its path."""
    rgb = rgb_array()
    grey16 = (np.linspace(0, 65535, H * W).reshape(H, W)).astype(np.uint16)
    path = str(folder / f"{kind}.{'jpg' if 'jpeg' in kind else 'png'}")
    if kind == "grey16_png":
        Image.fromarray(grey16).save(path)
    elif kind == "rgb16_png":
        cv2.imwrite(path, np.stack([grey16, grey16[::-1], 65535 - grey16], axis=2))
    elif kind == "grey_png":
        Image.fromarray(rgb[:, :, 0]).save(path)
    elif kind == "rgba_png":
        alpha = np.full((H, W, 1), 7, np.uint8)
        Image.fromarray(np.concatenate([rgb, alpha], axis=2), "RGBA").save(path)
    elif kind == "palette_png":
        Image.fromarray(rgb).convert("P").save(path)
    elif kind == "grey_alpha_png":
        Image.fromarray(np.stack([rgb[:, :, 1], rgb[:, :, 2]], axis=2), "LA").save(path)
    elif kind == "exif_rotated_jpeg":
        exif = Image.Exif()
        exif[0x0112] = 6  # rotate 90 degrees clockwise to display
        Image.fromarray(rgb).save(path, exif=exif.tobytes(), quality=95)
    elif kind == "cmyk_jpeg":
        Image.fromarray(rgb).convert("CMYK").save(path, quality=95)
    elif kind == "grey_jpeg":
        Image.fromarray(rgb[:, :, 0]).save(path, quality=95)
    return path


KINDS = [
    "grey16_png",
    "rgb16_png",
    "grey_png",
    "rgba_png",
    "palette_png",
    "grey_alpha_png",
    "exif_rotated_jpeg",
    "cmyk_jpeg",
    "grey_jpeg",
]


@pytest.mark.parametrize("kind", KINDS)
def test_both_decoders_give_8bit_bgr_the_same_way(tmp_path, kind):
    path = write_kind(tmp_path, kind)
    image = read_image(path)
    assert image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == 3
    assert image.shape[:2] == ((W, H) if kind == "exif_rotated_jpeg" else (H, W))
    by_pil = _decode_with_pil(open(path, "rb").read(), path)
    # Pillow's and libjpeg's CMYK -> RGB conversions round differently
    tolerance = 1 if kind == "cmyk_jpeg" else 0
    assert np.abs(by_pil.astype(int) - image.astype(int)).max() <= tolerance
    assert np.array_equal(read_image(path, "RGB"), image[:, :, ::-1])


def test_golden_pixels_of_16bit_grey_alpha_and_exif(tmp_path):
    grey16 = np.asarray(Image.open(write_kind(tmp_path, "grey16_png")))
    image = read_image(str(tmp_path / "grey16_png.png"))
    assert np.array_equal(image, np.repeat((grey16 >> 8).astype(np.uint8)[:, :, None], 3, 2))
    assert image.min() == 0 and image.max() == 255  # not detectron2's all-white image
    theirs = d2_read_image(str(tmp_path / "grey16_png.png"), "BGR")  # clips, not scales
    assert (theirs[grey16 >= 255] == 255).all() and (grey16 >= 255).mean() > 0.99
    rgba = read_image(write_kind(tmp_path, "rgba_png"))
    assert np.array_equal(rgba, rgb_array()[:, :, ::-1])  # alpha dropped, colours kept
    path = write_kind(tmp_path, "exif_rotated_jpeg")
    stored = cv2.imread(path, cv2.IMREAD_COLOR | cv2.IMREAD_IGNORE_ORIENTATION)
    assert np.array_equal(read_image(path), np.rot90(stored, k=-1))


@pytest.mark.parametrize("kind", ["grey16_png", "cmyk_jpeg", "exif_rotated_jpeg", "rgba_png"])
def test_training_mapper_and_test_loader_read_the_same_pixels(tmp_path, kind):
    path = write_kind(tmp_path, kind)
    h, w = read_image(path).shape[:2]
    cfg = aug_cfg(["RandomFlip"], ["INPUT.RANDOM_FLIP", "none"])
    cfg.INPUT.MIN_SIZE_TEST, cfg.INPUT.MAX_SIZE_TEST = min(h, w), max(h, w)  # no resize
    record = {"file_name": path, "image_id": 11, "height": h, "width": w}
    name = f"lt_image_io_{kind}"
    DatasetCatalog.register(name, lambda: [dict(record)])
    try:
        batch = next(iter(Trainer.build_test_loader(cfg, name)))
    finally:
        DatasetCatalog.remove(name)
    trained = LongTailDatasetMapper(cfg, True).load_sample(record).image
    tested = batch[0]["image"].numpy().transpose(1, 2, 0)
    assert np.array_equal(tested, trained)
    assert np.array_equal(tested, read_image(path))


def truncated_jpeg(folder, name="broken") -> str:
    path = str(folder / f"{name}.jpg")
    big = np.random.default_rng(1).integers(0, 256, (96, 128, 3), dtype=np.uint8)
    Image.fromarray(big).save(path, quality=90)
    data = open(path, "rb").read()
    with open(path, "wb") as f:
        f.write(data[: len(data) // 2])
    return path


def test_truncated_and_undecodable_files_are_errors_naming_file_and_id(tmp_path):
    jpeg = truncated_jpeg(tmp_path)
    with pytest.raises(UnreadableImageError, match=r"broken\.jpg \(image id 42\): truncated"):
        read_image(jpeg, "BGR", image_id=42)
    previous = ImageFile.LOAD_TRUNCATED_IMAGES
    ImageFile.LOAD_TRUNCATED_IMAGES = True  # as some projects set globally: still an error
    try:
        with pytest.raises(UnreadableImageError, match="truncated"):
            read_image(jpeg)
    finally:
        ImageFile.LOAD_TRUNCATED_IMAGES = previous
    png = write_kind(tmp_path, "grey_png")
    data = open(png, "rb").read()
    open(png, "wb").write(data[: len(data) - 30])
    with pytest.raises(UnreadableImageError, match=r"grey_png\.png \(image id 3\): truncated"):
        read_image(png, image_id=3)
    junk = tmp_path / "junk.jpg"
    junk.write_bytes(b"not an image at all")
    with pytest.raises(UnreadableImageError, match=r"junk\.jpg: cannot decode"):
        read_image(str(junk))
    (tmp_path / "empty.png").write_bytes(b"")
    with pytest.raises(UnreadableImageError, match=r"empty\.png \(image id 5\): empty file"):
        read_image(str(tmp_path / "empty.png"), image_id=5)
    with pytest.raises(UnreadableImageError, match=r"missing\.png \(image id 6\)"):
        read_image(str(tmp_path / "missing.png"), image_id=6)


def test_a_complete_jpeg_with_trailing_bytes_is_read(tmp_path):
    path = write_kind(tmp_path, "grey_jpeg")
    clean = read_image(path)
    with open(path, "ab") as f:
        f.write(b"trailing data a camera appended")
    assert np.array_equal(read_image(path), clean)


def broken_record(tmp_path):
    good = write_record(tmp_path, "good", (48, 64), [(1, rect(8, 8, 40, 30))])
    bad = dict(good, file_name=truncated_jpeg(tmp_path), image_id=77)
    return good, bad


@pytest.mark.parametrize("steps", [["RandomFlip"], ["Mosaic"]])
def test_training_skips_an_unreadable_image_with_a_warning_and_a_count(tmp_path, caplog, steps):
    good, bad = broken_record(tmp_path)
    always = ["INPUT.MOSAIC.PROB", 1.0, "INPUT.MOSAIC.TILE_SIZE", (48, 64)]
    mapper = LongTailDatasetMapper(aug_cfg(steps, always), True)
    group = [bad] + [good] * mapper.num_extra_images
    with caplog.at_level(logging.WARNING, logger="lvis_longtail.data.mapper"):
        assert mapper.map_group(group) is None
        if steps == ["Mosaic"]:  # an unreadable extra image skips the group too
            assert mapper.map_group([good, good, bad, good]) is None
    assert re.search(r"broken\.jpg \(image id 77\): truncated", caplog.text)
    assert mapper.skipped_images.total() == (2 if steps == ["Mosaic"] else 1)
    strict = LongTailDatasetMapper(
        aug_cfg(steps, ["DATALOADER.SKIP_UNREADABLE_IMAGES", False]), True
    )
    with pytest.raises(UnreadableImageError, match=r"image id 77"):
        strict.map_group(group)


def test_training_loader_workers_skip_and_count(tmp_path):
    from lvis_longtail.data.loader import build_longtail_train_loader

    good, bad = broken_record(tmp_path)
    name = "lt_image_io_broken_train"
    DatasetCatalog.register(name, lambda: [dict(good), dict(bad)])
    opts = ["DATALOADER.NUM_WORKERS", 2, "DATALOADER.SAMPLER_TRAIN", "TrainingSampler"]
    cfg = aug_cfg(["RandomFlip"], opts)
    cfg.DATASETS.TRAIN = (name,)
    cfg.SOLVER.IMS_PER_BATCH = 2
    try:
        loader = build_longtail_train_loader(cfg)
        batches = [b for _, b in zip(range(6), loader)]
    finally:
        DatasetCatalog.remove(name)
    assert all(d["image_id"] != 77 for b in batches for d in b)
    assert loader.skipped_images.total() >= 1  # counted in the workers, read here


def test_evaluation_stops_with_the_file_and_image_id(tmp_path):
    path = truncated_jpeg(tmp_path)
    for workers in (0, 1):
        cfg = aug_cfg(["RandomFlip"], ["DATALOADER.NUM_WORKERS", workers])
        name = f"lt_image_io_broken_test_{workers}"
        DatasetCatalog.register(
            name, lambda: [{"file_name": path, "image_id": 9, "height": 96, "width": 128}]
        )
        try:
            with pytest.raises(UnreadableImageError, match=r"broken\.jpg \(image id 9\)"):
                next(iter(Trainer.build_test_loader(cfg, name)))
        finally:
            DatasetCatalog.remove(name)


def test_no_other_image_decoding_in_the_package():
    """Every image file is decoded by lvis_longtail.data.image_io (the header read of the
    size check in lvis_format aside), every test loader maps with LongTailDatasetMapper."""
    decoders = re.compile(
        r"cv2\.imread|imdecode|Image\.open|utils\.read_image|import read_image"
        r"|build_detection_test_loader\("
    )
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE).as_posix()
        for line in path.read_text().splitlines():
            if decoders.search(line) and "lvis_longtail.data.image_io" not in line:
                found.append(f"{rel}: {line.strip()}")
    assert found == [
        "data/image_io.py: with Image.open(io.BytesIO(data)) as image:",
        "data/image_io.py: image = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)",
        "data/loader.py: return build_detection_test_loader(",
        "data/lvis_format.py: with Image.open(path) as im:",
    ]
