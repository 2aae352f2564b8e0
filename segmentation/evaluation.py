"""Stable public path of `segmentation.data.evaluation` (where the code lives)."""

from .data.evaluation import *  # noqa: F403
