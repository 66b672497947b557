"""Turning untrusted image bytes into a model input, with a clear error for anything that is not an image."""

from __future__ import annotations

import io
import warnings

from PIL import Image, UnidentifiedImageError


class ImageError(ValueError):
    """The ``image`` field cannot be used; the message says why (empty, too big, not an image, truncated)."""


def decode_image(data: bytes, max_bytes: int, max_pixels: int, max_aspect: float = 10.0) -> Image.Image:
    """Decode JPEG/PNG/... bytes into an RGB PIL image (grayscale and palette images are converted).

    Size limits are checked before decoding pixels: ``max_bytes`` on the encoded size, ``max_pixels`` on
    width x height and ``max_aspect`` on long side / short side, both read from the header, so a decompression
    bomb costs nothing. The aspect bound is what bounds the preprocessing: resizing the short side to ``r`` px
    makes at most ``max_aspect * r**2`` pixels (a 20,000,000 x 1 image is small as a file and in pixels, but
    resized to a short side of 128 px it would need 2.6 G pixels). Raises ImageError.
    """
    if not data:
        raise ImageError("image: empty (0 bytes)")
    if len(data) > max_bytes:
        raise ImageError(f"image: {len(data)} bytes is over the limit of {max_bytes} (max_image_bytes)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
            width, height = image.size
            if width * height > max_pixels:
                raise ImageError(f"image: {width}x{height} pixels is over the limit of {max_pixels} "
                                 "(max_image_pixels)")
            if max(width, height) > max_aspect * min(width, height):
                raise ImageError(f"image: {width}x{height} has an aspect ratio over the limit of {max_aspect:g} "
                                 "(max_image_aspect)")
            image.load()  # decodes now, so truncated data fails here and not inside the transform
            return image.convert("RGB")  # inside the try: an exotic mode that cannot convert is an ImageError
    except ImageError:
        raise
    except UnidentifiedImageError:
        raise ImageError("image: not a recognised image format (JPEG or PNG expected)") from None
    except (OSError, ValueError, Image.DecompressionBombError) as err:
        raise ImageError(f"image: cannot be decoded ({err})") from None
