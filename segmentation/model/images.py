"""Turning uploaded bytes into the RGB image the model and the masks are measured against."""

from __future__ import annotations

import io
import re
import warnings

from PIL import Image, ImageOps, UnidentifiedImageError

DEFAULT_MAX_PIXELS = 40_000_000  # 40 MP: a 8000x5000 photo passes, a decompression bomb does not
ACCEPTED_FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "BMP", "TIFF")
# The largest model-input picture the engine takes from a caller, pixels a side (PaliGemma reads 224, 448
# or 896 px squares; the engine's processor resizes whatever it gets).
MAX_MODEL_SIDE = 1024


class ImageError(ValueError):
    """Bytes that are not an image we accept; the message says why and what is accepted."""


class ImageTooLarge(ImageError):
    """An image over the pixel limit."""


def open_image(data: bytes, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Decode `data` by its content (not its declared type) into an upright RGB image.

    EXIF orientation is applied, so width and height are those of the upright picture; grayscale,
    palette, RGBA, CMYK and 16-bit images become RGB; an animated image gives its first frame.
    """
    if not data:
        raise ImageError("the image is empty (0 bytes)")
    try:
        with warnings.catch_warnings():
            # Pillow warns (and past 2x raises) on decompression bombs; we judge size ourselves.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data), formats=ACCEPTED_FORMATS)
            width, height = image.size
            if width * height > max_pixels:
                raise ImageTooLarge(
                    f"the image is {width}x{height} = {width * height} pixels; the limit is {max_pixels}"
                )
            image.seek(0)
            image.load()
    except ImageError:
        raise
    except Image.DecompressionBombError as exc:  # past twice Pillow's own limit: refused while opening
        # Pillow's message holds the header's pixel count ("Image size (N pixels) exceeds ..."): say it in ours.
        found = re.search(r"\((\d+) pixels\)", str(exc))
        size = f"is {found.group(1)} pixels" if found else f"has more than {max_pixels} pixels"
        raise ImageTooLarge(f"the image {size}; the limit is {max_pixels}") from exc
    except UnidentifiedImageError as exc:  # its message holds the repr of a BytesIO: not for clients
        raise ImageError(
            f"the data is not a readable image; accepted formats: {', '.join(ACCEPTED_FORMATS)}"
        ) from exc
    except (OSError, SyntaxError, ValueError) as exc:  # truncated or corrupt data (Pillow's text: not for clients)
        accepted = ", ".join(ACCEPTED_FORMATS)
        raise ImageError(f"the image could not be decoded (truncated or corrupt data); accepted formats: {accepted}") \
            from exc
    return to_rgb(ImageOps.exif_transpose(image))


def to_rgb(image: Image.Image) -> Image.Image:
    """RGB, whatever the mode: 16-bit and float grayscale are scaled, alpha is dropped."""
    if image.mode == "RGB":
        return image
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        # 16/32-bit grayscale: Pillow's plain convert("L") clips at 255, so scale to 8 bits first.
        image = image.point(lambda v: v / 256).convert("L")
    elif image.mode == "F":
        image = image.convert("L")
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        image = image.convert("RGBA")
        background = Image.new("RGBA", image.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, image).convert("RGB")
    return image.convert("RGB")


def model_input(image: Image.Image, size: int) -> Image.Image:
    """The `size`x`size` RGB picture the model sees (bicubic, as PaliGemma's image processor).

    Both the library and the service resize here, so a pre-resized image gives the same answer
    as the original: resizing to the size an image already has is a copy.
    """
    image = to_rgb(image)
    if image.size == (size, size):
        return image
    return image.resize((size, size), Image.Resampling.BICUBIC)
