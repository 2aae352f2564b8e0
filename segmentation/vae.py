"""Stable public path of `segmentation.model.vae` (where the code lives)."""

from .model.vae import *  # noqa: F403
