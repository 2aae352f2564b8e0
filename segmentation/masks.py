"""Stable public path of `segmentation.model.masks` (where the code lives)."""

from .model.masks import *  # noqa: F403
