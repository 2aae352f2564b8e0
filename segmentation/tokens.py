"""Stable public path of `segmentation.model.tokens` (where the code lives)."""

from .model.tokens import *  # noqa: F403
