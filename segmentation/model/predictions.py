"""What the model said about an image, and placing it on the original image.

Torch-free on purpose: the public service process assembles answers without loading the model
libraries. A `Prediction` crosses from the engine process as a plain dict (`to_dict` / `from_dict`).
"""

from __future__ import annotations

import base64
from dataclasses import asdict, dataclass, field

import numpy as np

from .masks import paste_mask, paste_soft_mask
from .results import DetectedObject, SegmentationResult
from .tokens import box_normalized, box_to_pixels, is_valid_box


@dataclass
class ObjectPrediction:
    label: str
    locs: tuple[int, int, int, int]
    score: float
    mask64: np.ndarray | None  # raw decoder output [64, 64] float32, None without 16 codes


@dataclass
class Prediction:
    """What the model said about one image, before anything depends on the image's own size: its text and
    objects, and per emitted token its text and log-probability; the tokens of the prompt (image tokens
    included) and why the answer ended (`stop`, or `length`: its budget or a cut)."""

    prompt: str
    text: str
    objects: list[ObjectPrediction] = field(default_factory=list)
    generated_tokens: int = 0
    prompt_tokens: int = 0
    finish_reason: str = "stop"
    tokens: list[str] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)

    def to_dict(self) -> dict:
        """JSON-ready types for crossing a process boundary; masks as base64 float32 (exact, compact)."""
        data = asdict(self)
        for obj in data["objects"]:
            if obj["mask64"] is not None:
                obj["mask64"] = base64.b64encode(np.ascontiguousarray(obj["mask64"], "<f4").tobytes()).decode()
        return data

    @classmethod
    def from_dict(cls, data: dict) -> Prediction:
        objects = [
            ObjectPrediction(
                label=o["label"], locs=tuple(o["locs"]), score=float(o["score"]),
                mask64=None if o["mask64"] is None else np.frombuffer(
                    base64.b64decode(o["mask64"]), dtype="<f4").reshape(64, 64).astype(np.float32),
            )
            for o in data["objects"]
        ]
        return cls(data["prompt"], data["text"], objects, int(data["generated_tokens"]),
                   prompt_tokens=int(data.get("prompt_tokens", 0)), finish_reason=data.get("finish_reason", "stop"),
                   tokens=list(data.get("tokens", [])), logprobs=[float(v) for v in data.get("logprobs", [])])


def assemble(prediction: Prediction, width: int, height: int, *, soft: bool = False) -> SegmentationResult:
    """Place a prediction on the original image: pixel boxes by the evaluator's rule, pasted masks.

    Objects whose pixel box is empty (y2 <= y1 or x2 <= x1 after `int()`) are dropped, as the
    evaluator counts them invalid. `soft` gives float probability masks instead of booleans.
    """
    paste = paste_soft_mask if soft else paste_mask
    objects = []
    for o in prediction.objects:
        box = box_to_pixels(o.locs, width, height)
        if not is_valid_box(box):
            continue
        mask = paste(o.mask64, box, width, height) if o.mask64 is not None else None
        objects.append(DetectedObject(
            label=o.label, score=o.score, box=box, box_normalized=box_normalized(o.locs),
            mask=mask, mask64=o.mask64,
        ))
    return SegmentationResult(
        prompt=prediction.prompt, text=prediction.text, width=width, height=height, objects=objects
    )
