"""Stable public path of the mask encoder (`segmentation.model.encoder`) and of `encode_object`
(`segmentation.model.targets`): users' masks to PaliGemma's `<loc>`/`<seg>` text."""

from .model.encoder import *  # noqa: F403
from .model.targets import encode_object  # noqa: F401
