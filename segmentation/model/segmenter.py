"""From images and prompts to labelled boxes, scores and masks: the library's front door.

    from segmentation import Segmenter
    segmenter = Segmenter.from_pretrained("path/to/paligemma", "path/to/vae-oid.npz")
    [result] = segmenter.segment([image], ["cat ; dog"])

Work is split in two steps so a server can run them in different places: `predict` (the model and
the mask decoder, batched; returns small picklable `Prediction`s with 64x64 masks) and `assemble`
(pasting masks into the original image size; CPU work per request).

Score of an object: the geometric mean of the probabilities the model gave the tokens that state
the object's box and label (its four `<loc>` tokens and its label's tokens), under the model's own
distribution before the grammar's masking. Mask codes are left out: many codes draw nearly the same
mask, so their probabilities say little about whether the object is there. 1.0 means the model was
certain of every box and label token.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
from PIL import Image

from .engine import Generation, PaliGemmaEngine
from .predictions import ObjectPrediction, Prediction, assemble
from .prompts import Prompt, Task, parse_prompt
from .results import SegmentationResult
from .tokens import ParsedObject, parse_objects
from .vae import MaskDecoder


def object_score(obj: ParsedObject, generation: Generation, seg_ids: frozenset[int]) -> float:
    """Geometric mean probability of the object's box and label tokens (see the module docstring)."""
    start, end = obj.span
    logprobs = [
        logprob
        for token, (a, b), logprob in zip(generation.token_ids, generation.token_spans, generation.token_logprobs)
        if start <= a and b <= end and b > a and token not in seg_ids and generation.text[a:b].strip()
    ]
    return math.exp(sum(logprobs) / len(logprobs)) if logprobs else 0.0


@dataclass
class ParsedGeneration:
    """A generation with its objects parsed and scored, masks not yet decoded."""

    prompt: Prompt
    generation: Generation
    objects: list[ParsedObject]
    scores: list[float]


def parse_generations(
    engine: PaliGemmaEngine,
    images: list[Image.Image],
    prompts: list[Prompt],
    *,
    max_new_tokens: list[int] | None = None,
    adapters: list[str | None] | None = None,
    cut_after: list[int | None] | None = None,
) -> list[ParsedGeneration]:
    """One batched `generate` call, parsed into objects with scores (`adapters`: each row's LoRA adapter;
    `cut_after`: each row's answer cut after that many tokens, see `PaliGemmaEngine.conclude`)."""
    generations = engine.generate(images, prompts, max_new_tokens=max_new_tokens, adapters=adapters)
    budgets = max_new_tokens or [None] * len(prompts)
    cuts = cut_after or [None] * len(prompts)
    generations = [engine.conclude(g, budget=engine.row_spec(p, b).budget, cut_after=c)
                   for g, p, b, c in zip(generations, prompts, budgets, cuts)]
    return [parse_generation(engine, prompt, generation) for prompt, generation in zip(prompts, generations)]


def parse_generation(engine: PaliGemmaEngine, prompt: Prompt, generation: Generation) -> ParsedGeneration:
    """One generation's objects, each with its score."""
    objects = parse_objects(generation.text)
    scores = [object_score(o, generation, engine.vocab.seg_ids) for o in objects]
    return ParsedGeneration(prompt, generation, objects, scores)


def attach_masks(decoder: MaskDecoder, parsed: list[ParsedGeneration]) -> list[Prediction]:
    """Decode the masks of every object of every generation in one decoder call."""
    codes = [o.codes for p in parsed for o in p.objects if o.codes is not None]
    masks = iter(decoder.decode(np.array(codes, dtype=np.int32).reshape(-1, 16)))
    return [
        Prediction(
            prompt=p.prompt.text,
            text=p.generation.text,
            generated_tokens=len(p.generation.token_ids),
            prompt_tokens=p.generation.prompt_tokens,
            finish_reason=p.generation.finish_reason,
            tokens=p.generation.token_texts,
            logprobs=list(p.generation.token_logprobs),
            objects=[
                ObjectPrediction(o.label, o.locs, score, next(masks) if o.codes is not None else None)
                for o, score in zip(p.objects, p.scores)
            ],
        )
        for p in parsed
    ]


class Segmenter:
    """PaliGemma 2 plus the VQ-VAE mask decoder."""

    def __init__(self, engine: PaliGemmaEngine, decoder: MaskDecoder):
        self.engine = engine
        self.decoder = decoder

    @classmethod
    def from_pretrained(cls, model_dir: str | Path, vae_path: str | Path, **engine_kwargs) -> Segmenter:
        """Load a PaliGemma directory (`save_pretrained` layout) and a `vae-oid.npz` checkpoint."""
        return cls(PaliGemmaEngine.from_pretrained(model_dir, **engine_kwargs), MaskDecoder.from_npz(vae_path))

    @property
    def image_size(self) -> int:
        return self.engine.image_size

    def predict(
        self,
        images: list[Image.Image],
        prompts: list[Prompt],
        *,
        max_new_tokens: list[int] | None = None,
    ) -> list[Prediction]:
        """Generate for the whole batch, then decode every object's mask in one decoder call."""
        parsed = parse_generations(self.engine, images, prompts, max_new_tokens=max_new_tokens)
        return attach_masks(self.decoder, parsed)

    def segment(
        self,
        images: list[Image.Image],
        prompts: list[str] | str,
        *,
        task: Task = "segment",
        soft: bool = False,
        labels_from_prompt: bool = False,
    ) -> list[SegmentationResult]:
        """Objects with boxes and masks for each image (`prompts`: one per image, or one for all).

        `labels_from_prompt`: every label is exactly one of the prompt's classes (the grammar allows
        nothing else), so each object maps to a requested class.
        """
        if isinstance(images, Image.Image):
            images = [images]
        if isinstance(prompts, str):
            prompts = [prompts] * len(images)
        parsed = [replace(parse_prompt(p, task), labels_from_prompt=labels_from_prompt) for p in prompts]
        predictions = self.predict(images, parsed)
        return [assemble(p, *image.size, soft=soft) for p, image in zip(predictions, images)]

    def detect(
        self, images: list[Image.Image], prompts: list[str] | str, *, labels_from_prompt: bool = False
    ) -> list[SegmentationResult]:
        """Boxes only (`detect` prompts: no mask codes are generated)."""
        return self.segment(images, prompts, task="detect", labels_from_prompt=labels_from_prompt)
