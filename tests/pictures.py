"""Random test pictures, the same for a seed wherever a test draws them."""

import numpy as np
from PIL import Image


def random_image(width: int, height: int, seed: int) -> Image.Image:
    """An RGB picture of uniform random pixels, [height, width, 3] uint8."""
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))
