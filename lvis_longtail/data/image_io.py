"""The one image reader of training, evaluation, test-time augmentation and the tools.

:func:`read_image` decodes with OpenCV (libjpeg-turbo, EXIF orientation applied) into 8-bit
BGR, whatever the file holds: greyscale is replicated to three channels, 16-bit samples keep
their top 8 bits (``v >> 8``), an alpha channel is dropped, CMYK becomes BGR. Other
``INPUT.FORMAT`` values are converted from that by detectron2's ``convert_PIL_to_numpy``, so
training and evaluation see the same pixels for every file. (detectron2's own ``read_image``
turns a 16-bit greyscale PNG into an all-white image.)

A file that cannot be decoded completely raises :class:`UnreadableImageError` naming the file
and the dataset's image id; it is never returned with its missing part filled grey. JPEG and
PNG files are checked for their end marker first (libjpeg decodes a truncated JPEG without an
error); a file without one, or one OpenCV cannot decode, is decoded by Pillow with
``LOAD_TRUNCATED_IMAGES`` off, which raises for a truncated file.
"""

import contextlib
import io
import logging
import os
import tempfile
import weakref
from typing import List

import cv2
import numpy as np
from detectron2.data.detection_utils import convert_PIL_to_numpy
from detectron2.utils.file_io import PathManager
from PIL import Image, ImageFile, ImageOps

logger = logging.getLogger(__name__)

# file signature -> the bytes a complete file ends with
_END_MARKERS = {
    b"\xff\xd8\xff": b"\xff\xd9",  # JPEG: EOI marker
    b"\x89PNG\r\n\x1a\n": b"IEND\xaeB`\x82",  # PNG: IEND chunk and its CRC
}
_SIXTEEN_BIT_GREY = ("I;16", "I;16L", "I;16B", "I")


class UnreadableImageError(OSError):
    """An image file that is missing, truncated or cannot be decoded; the message names the
    file and the image id."""


def _where(file_name: str, image_id) -> str:
    return file_name if image_id is None else f"{file_name} (image id {image_id})"


def _has_end_marker(data: bytes) -> bool:
    """False for a JPEG or PNG whose last bytes (trailing zero padding aside) are not its
    format's end marker; True for other formats (their decoders report truncation)."""
    for signature, end in _END_MARKERS.items():
        if data.startswith(signature):
            return data.rstrip(b"\x00").endswith(end)
    return True


def _pil_to_bgr(image: Image.Image) -> np.ndarray:
    """8-bit BGR (H, W, 3) of a Pillow image, as OpenCV's ``IMREAD_COLOR`` decodes files."""
    image = ImageOps.exif_transpose(image)
    if image.mode in _SIXTEEN_BIT_GREY:
        grey = (np.asarray(image).astype(np.int64) >> 8).clip(0, 255).astype(np.uint8)
        return np.repeat(grey[:, :, None], 3, axis=2)
    return np.ascontiguousarray(np.asarray(image.convert("RGB"))[:, :, ::-1])


def _decode_with_pil(data: bytes, where: str) -> np.ndarray:
    previous = ImageFile.LOAD_TRUNCATED_IMAGES
    ImageFile.LOAD_TRUNCATED_IMAGES = False  # a truncated file raises, never fills grey
    try:
        with Image.open(io.BytesIO(data)) as image:
            image.load()
            return _pil_to_bgr(image)
    except Exception as e:  # Pillow raises OSError, SyntaxError, ValueError, ... per format
        reason = "truncated file" if not _has_end_marker(data) else "cannot decode"
        raise UnreadableImageError(
            f"{where}: {reason} ({len(data):,} bytes): {type(e).__name__}: {e}"
        ) from None
    finally:
        ImageFile.LOAD_TRUNCATED_IMAGES = previous


def read_image(file_name: str, image_format: str = "BGR", image_id=None) -> np.ndarray:
    """Read an image file into ``image_format`` (see the module docstring).

    Args:
        file_name: a local path or a detectron2 ``PathManager`` URI.
        image_format: ``INPUT.FORMAT``: "BGR", "RGB", or any format detectron2's
            ``read_image`` accepts ("L", "YUV-BT.601", ...).
        image_id: the dataset's id of the image, for messages.

    Returns:
        (H, W, C) array: uint8 for BGR, RGB and Pillow modes; float for "YUV-BT.601".

    Raises:
        UnreadableImageError: the file is missing, truncated or cannot be decoded.
    """
    where = _where(file_name, image_id)
    try:
        with PathManager.open(file_name, "rb") as f:
            data = f.read()
    except OSError as e:
        raise UnreadableImageError(f"{where}: {e.strerror or e}") from None
    if not data:
        raise UnreadableImageError(f"{where}: empty file")
    image = None
    if _has_end_marker(data):
        try:
            image = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
        except cv2.error:
            image = None
    if image is None:
        image = _decode_with_pil(data, where)
    if image_format == "BGR":
        return image
    if image_format == "RGB":
        return image[:, :, ::-1]
    rgb = Image.fromarray(np.ascontiguousarray(image[:, :, ::-1]))
    return convert_PIL_to_numpy(rgb, image_format)


class SkippedImages:
    """The training samples skipped for an unreadable image, recorded across DataLoader
    workers: with workers, one line per skip appended to a small file (``O_APPEND`` writes of
    a line are atomic), which the training process reads; only the file's path is pickled,
    so the record survives however the loader ships the mapper to its workers (detectron2's
    ``MapDataset`` cloudpickles it, which would copy a shared tensor). Without workers, a
    list. The process that made the file removes it when this object is collected.

    Args:
        num_workers: ``DATALOADER.NUM_WORKERS``.
    """

    def __init__(self, num_workers: int = 0):
        self.path = None
        self._lines = []
        self._read = self._count = 0
        if num_workers > 0:
            folder = "/dev/shm" if os.path.isdir("/dev/shm") else None
            fd, self.path = tempfile.mkstemp(prefix="lvis_longtail_skipped_", dir=folder)
            os.close(fd)
            weakref.finalize(self, _remove_if_owner, self.path, os.getpid())

    def add(self, message: str) -> None:
        line = " ".join(message.split())  # one line per skip
        if self.path is None:
            self._lines.append(line)
            return
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND)
        try:
            os.write(fd, (line + "\n").encode("utf-8"))
        finally:
            os.close(fd)

    def messages(self) -> List[str]:
        if self.path is None:
            return list(self._lines)
        with open(self.path, encoding="utf-8") as f:
            return f.read().splitlines()

    def total(self) -> int:
        """The number of skips so far (reads only what was appended since the last call)."""
        if self.path is None:
            return len(self._lines)
        with open(self.path, "rb") as f:
            f.seek(self._read)
            new = f.read()
        self._read += len(new)
        self._count += new.count(b"\n")
        return self._count


def _remove_if_owner(path: str, owner: int) -> None:
    if os.getpid() == owner:
        with contextlib.suppress(FileNotFoundError):
            os.remove(path)
