import io

import numpy as np
import pytest
from PIL import Image

from segmentation.model.images import ImageError, ImageTooLarge, model_input, open_image


def encode(image: Image.Image, fmt: str, **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **kwargs)
    return buffer.getvalue()


GRADIENT = Image.fromarray(np.tile(np.arange(0, 250, 2, dtype=np.uint8), (40, 1)))  # 125x40 gray


@pytest.mark.parametrize(
    ("image", "fmt"),
    [
        (GRADIENT.convert("RGB"), "PNG"),
        (GRADIENT, "PNG"),
        (GRADIENT.convert("P"), "GIF"),
        (GRADIENT.convert("RGBA"), "PNG"),
        (GRADIENT.convert("CMYK"), "JPEG"),
        (GRADIENT.convert("RGB"), "WEBP"),
        (GRADIENT.convert("RGB"), "BMP"),
        (GRADIENT.convert("RGB"), "TIFF"),
        (Image.fromarray(np.asarray(GRADIENT).astype(np.uint16) * 256), "PNG"),  # 16-bit gray
    ],
)
def test_every_mode_becomes_rgb(image, fmt):
    out = open_image(encode(image, fmt))
    assert out.mode == "RGB" and out.size == (125, 40)
    # The gradient survives (not clipped to white as a careless 16-bit conversion would).
    row = np.asarray(out.convert("L"))[20]
    assert row[0] < 20 and row[-1] > 200


def test_exif_orientation_is_applied():
    image = Image.new("RGB", (60, 20), (255, 0, 0))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    out = open_image(encode(image, "JPEG", exif=exif))
    assert out.size == (20, 60)


def test_animated_image_gives_its_first_frame():
    frames = [Image.new("RGB", (10, 10), c) for c in [(255, 0, 0), (0, 0, 255)]]
    data = encode(frames[0], "GIF", save_all=True, append_images=frames[1:])
    assert open_image(data).getpixel((5, 5))[0] > 200


@pytest.mark.parametrize(
    ("data", "message"),
    [(b"", "empty"), (b"hello", "not a readable image"), (b"GIF89a" + b"\0" * 5, "image"),
     (encode(Image.new("RGB", (50, 50)), "PNG")[:60], "image")],
)
def test_bad_data(data, message):
    with pytest.raises(ImageError, match=message):
        open_image(data)


@pytest.mark.parametrize(("side", "message"), [(40000, "1600000000 pixels"), (8000, "8000x8000")])
def test_decompression_bomb_is_refused_before_decoding(side, message):
    bomb = encode(Image.new("1", (side, side)), "PNG")  # a few KB that would decode to many pixels
    with pytest.raises(ImageTooLarge, match=message):
        open_image(bomb)


def test_model_input_is_square_rgb_and_idempotent():
    picture = model_input(GRADIENT, 224)
    assert picture.size == (224, 224) and picture.mode == "RGB"
    assert np.array_equal(np.asarray(model_input(picture, 224)), np.asarray(picture))
