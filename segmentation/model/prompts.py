"""Prompts for PaliGemma 2 mix: `segment <expr>` / `detect <expr>`, several classes joined by ` ; `.

Users write "cat", "cat; dog", "segment the man on the left" or "detect car ; bus". A leading task
word is accepted and dropped (the API route picks the task); classes are split on `;`, trimmed and
rejoined with the ` ; ` the model was trained on.
"""

from __future__ import annotations

import unicodedata
from dataclasses import dataclass
from typing import Literal

Task = Literal["segment", "detect"]
TASKS: tuple[Task, ...] = ("segment", "detect")

MAX_PROMPT_CHARS = 1000
MAX_CLASSES = 32
# Tokens per object besides its label: 4 locs, 16 codes (segment only), and the ` ;` + ` ` separator.
_LOC_TOKENS = 4
_CODE_TOKENS = 16
_SEPARATOR_TOKENS = 2
DEFAULT_OBJECTS_PER_CLASS = 5
DEFAULT_MAX_NEW_TOKENS = 512


class PromptError(ValueError):
    """A prompt the service refuses; the message says what is wrong and what is accepted."""


@dataclass(frozen=True)
class Prompt:
    task: Task
    classes: tuple[str, ...]
    # Labels may only be the prompt's own classes, token for token (COCO-style evaluation needs every
    # object to name a requested class). Off by default: the model then writes labels freely.
    labels_from_prompt: bool = False

    @property
    def text(self) -> str:
        """What the model reads, e.g. `segment cat ; dog`."""
        return f"{self.task} {' ; '.join(self.classes)}"


def parse_prompt(
    prompt: str,
    task: Task = "segment",
    *,
    max_chars: int = MAX_PROMPT_CHARS,
    max_classes: int = MAX_CLASSES,
) -> Prompt:
    """Validate a user prompt and normalise it for `task`; raise PromptError when it can't be used."""
    if task not in TASKS:
        raise PromptError(f"unknown task {task!r}; accepted: {', '.join(TASKS)}")
    if not isinstance(prompt, str):
        raise PromptError(f"prompt must be a string, got {type(prompt).__name__}")
    if len(prompt) > max_chars:
        raise PromptError(f"prompt is {len(prompt)} characters long; the limit is {max_chars}")
    bad = next((c for c in prompt if unicodedata.category(c) in ("Cc", "Cf", "Cs", "Co", "Cn")
                and c not in " \t"), None)
    if bad is not None:
        raise PromptError(f"prompt contains the control character U+{ord(bad):04X}; use plain text")
    if "<" in prompt or ">" in prompt:
        # `<loc0001>` or `<image>` typed by a user would be read as model tokens.
        raise PromptError("prompt may not contain '<' or '>'")
    body = " ".join(prompt.split())  # tabs and runs of spaces become one space
    first, _, rest = body.partition(" ")
    if first.lower() in TASKS:
        body = rest
    classes = tuple(c.strip() for c in body.split(";") if c.strip())
    if not classes:
        raise PromptError(
            "prompt is empty; send one or more classes or phrases separated by ';', e.g. 'cat ; dog'"
        )
    if len(classes) > max_classes:
        raise PromptError(f"prompt names {len(classes)} classes; the limit is {max_classes} per request")
    return Prompt(task=task, classes=classes)


def object_token_cost(label_tokens: int, task: Task) -> int:
    """Tokens one object costs: 4 locs, 16 codes when segmenting, its label and the separator."""
    return _LOC_TOKENS + (_CODE_TOKENS if task == "segment" else 0) + label_tokens + _SEPARATOR_TOKENS


def max_new_tokens_for(
    label_token_counts: list[int],
    task: Task,
    *,
    objects_per_class: int = DEFAULT_OBJECTS_PER_CLASS,
    ceiling: int = DEFAULT_MAX_NEW_TOKENS,
) -> int:
    """A generation budget that fits `objects_per_class` objects of every class, capped at `ceiling`.

    A fixed budget (100 in many demos) silently caps the answer at about four objects; this one
    grows with the number of classes and the length of their names.
    """
    need = sum(objects_per_class * object_token_cost(n, task) for n in label_token_counts)
    return max(1, min(need, ceiling))
