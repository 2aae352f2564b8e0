"""The service's own Prometheus metrics, beside BentoML's request counters and batch sizes."""

from __future__ import annotations

from typing import TYPE_CHECKING

import bentoml

if TYPE_CHECKING:  # the public service imports this module and must not import torch
    from .pool import PredictOutcome

STAGE_SECONDS = bentoml.metrics.Histogram(
    name="segmentation_stage_seconds",
    documentation="Seconds spent per request stage",
    labelnames=["stage"],
    buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
)
OBJECTS = bentoml.metrics.Histogram(
    name="segmentation_objects_per_request",
    documentation="Objects found per image",
    buckets=(0, 1, 2, 3, 5, 8, 13, 21, 34),
)
TOKENS = bentoml.metrics.Histogram(
    name="segmentation_generated_tokens",
    documentation="Tokens generated per image",
    buckets=(1, 8, 16, 32, 64, 128, 256, 512, 1024),
)


def observe_stage(stage: str, seconds: float) -> None:
    STAGE_SECONDS.labels(stage=stage).observe(seconds)


def observe_outcome(outcome: PredictOutcome) -> None:
    """An engine outcome's stage timings, tokens and objects."""
    for stage, seconds in outcome.timings.items():
        observe_stage(stage, seconds)
    if outcome.prediction is not None:
        TOKENS.observe(outcome.prediction.generated_tokens)
        OBJECTS.observe(len(outcome.prediction.objects))
