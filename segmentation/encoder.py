"""Stable public path of the mask encoder (`segmentation.model.encoder`) and of `encode_object`
(`segmentation.data.targets`): users' masks to PaliGemma's `<loc>`/`<seg>` text."""

from .data.targets import encode_object  # noqa: F401
from .model.encoder import *  # noqa: F403
