"""A pixel limit for every image this code decodes: training and evaluation images, galleries, queries, uploads.

A PNG of 200 megapixels can be a 200 KB file and takes gigabytes to decode; Pillow's own guard warns at 89 and
refuses at 179 megapixels only. :func:`check_pixels` reads the size from the header (``Image.open`` is lazy) and
refuses an image above ``data.max_image_pixels`` before anything is decoded, with an ImageTooLargeError, an
OSError like any unreadable image: training and gallery indexing skip and count it, a query is refused in one
line. The limit is process-wide (:func:`set_max_image_pixels`, applied from the config at start-up); DataLoader
workers forked afterwards inherit it. Only Pillow is imported.
"""
from __future__ import annotations

from PIL import Image

# 50 megapixels: above any pedestrian crop and an ordinary photo (a 48-megapixel phone picture), below what makes
# one decode cost gigabytes (RGB at 50 MP is 150 MB).
DEFAULT_MAX_IMAGE_PIXELS = 50_000_000
_limit = DEFAULT_MAX_IMAGE_PIXELS


class ImageTooLargeError(OSError):
    """An image above the pixel limit; the message names the file, its size and the limit."""


def set_max_image_pixels(limit: int) -> None:
    """Set the process-wide limit (``data.max_image_pixels``); Pillow's own refusal is moved above it."""
    global _limit
    if not isinstance(limit, int) or isinstance(limit, bool) or limit < 1:
        raise ValueError(f"data.max_image_pixels must be a positive integer, got {limit!r}")
    _limit = limit
    if Image.MAX_IMAGE_PIXELS is not None and 2 * Image.MAX_IMAGE_PIXELS < limit:
        Image.MAX_IMAGE_PIXELS = limit


def max_image_pixels() -> int:
    return _limit


def too_large(path: object, width: int, height: int) -> ImageTooLargeError:
    return ImageTooLargeError(f"{path}: {width}x{height} pixels ({width * height / 1e6:.0f} megapixels), more than "
                              f"the limit of {_limit / 1e6:.0f} megapixels (data.max_image_pixels); shrink the "
                              "image or raise the limit")


def check_pixels(image: Image.Image, path: object) -> None:
    """ImageTooLargeError when the opened (not yet decoded) ``image`` has more pixels than the limit."""
    width, height = image.size
    if width * height > _limit:
        raise too_large(path, width, height)


def open_image(path) -> Image.Image:
    """``Image.open`` with the pixel limit: ImageTooLargeError also for what Pillow refuses as a bomb itself."""
    try:
        image = Image.open(path)
    except Image.DecompressionBombError as exc:
        raise ImageTooLargeError(f"{path}: more than the limit of {_limit / 1e6:.0f} megapixels "
                                 f"(data.max_image_pixels; {exc})") from None
    try:
        check_pixels(image, path)
    except ImageTooLargeError:
        image.close()
        raise
    return image
