"""Grammar-constrained decoding and per-row token budgets for PaliGemma's object syntax.

`ObjectGrammar` is a transformers `LogitsProcessor` holding a small state machine per batch row. With
the grammar on, every object a row emits is well formed:

    <loc y1><loc x1><loc y2 > y1><loc x2 > x1>  16 x <seg>  (segment only)  label  then ` ;` or end

and a row only starts an object that fits in its remaining budget. Each row also keeps its own token
budget (`max_new_tokens` of a batch is the largest one; a row past its own budget is forced to end),
so a row in a batch generates exactly what it would generate alone.

The processor also records the probability the model gave each token it emitted, taken from the
model's own distribution before any masking: the raw material for object confidence scores.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import LogitsProcessor

from .tokens import CODES_PER_MASK, LOC_BINS, SEG_CODES

_START, _LOC, _SEG, _LABEL_FIRST, _LABEL, _DONE = range(6)


@dataclass(frozen=True)
class RowSpec:
    """What one batch row may generate."""

    task: str  # "segment" or "detect"
    budget: int  # this row's own max_new_tokens
    constrained: bool = True
    # A label may run this many tokens, then only ` ;` or the end may follow. PaliGemma answers with
    # the prompt's own class names, so the engine allows the longest class plus some slack.
    max_label_tokens: int = 32
    # When set, a label must be exactly one of these token sequences (the prompt's classes as the
    # tokenizer writes them after the mask codes), so every object names a requested class.
    allowed_labels: tuple[tuple[int, ...], ...] | None = None


class Vocabulary:
    """Which token ids are locations, codes, label text, separators; built once per tokenizer."""

    def __init__(self, tokenizer, logits_width: int):
        size = logits_width
        self.eos_id = int(tokenizer.eos_token_id)
        loc_ids = tokenizer.convert_tokens_to_ids([f"<loc{i:04d}>" for i in range(LOC_BINS)])
        seg_ids = tokenizer.convert_tokens_to_ids([f"<seg{i:03d}>" for i in range(SEG_CODES)])
        unk = tokenizer.unk_token_id
        if unk in loc_ids or unk in seg_ids:
            raise ValueError("tokenizer lacks PaliGemma's <locNNNN>/<segNNN> tokens")
        self.loc_bin = torch.full((size,), -1, dtype=torch.long)
        self.loc_bin[loc_ids] = torch.arange(LOC_BINS)
        self.is_loc = self.loc_bin >= 0
        self.is_seg = torch.zeros(size, dtype=torch.bool)
        self.is_seg[seg_ids] = True
        self.seg_ids = frozenset(seg_ids)

        special = set(tokenizer.all_special_ids)
        self.is_label = torch.zeros(size, dtype=torch.bool)  # may continue a label
        self.is_label_text = torch.zeros(size, dtype=torch.bool)  # may start one (not just spaces)
        self.is_separator = torch.zeros(size, dtype=torch.bool)  # ";" with optional spaces
        self.is_space = torch.zeros(size, dtype=torch.bool)
        pieces = tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
        for token_id, piece in enumerate(pieces):
            if piece is None or token_id in special or token_id >= size:
                continue
            if self.is_loc[token_id] or self.is_seg[token_id]:
                continue
            text = piece.replace("▁", " ")
            if text.startswith("<0x") or any(c in text for c in "<>\n\r\t"):
                continue  # byte pieces and markup never belong in a label
            if ";" in text:
                self.is_separator[token_id] = text.strip() == ";"
            elif text.strip():
                self.is_label[token_id] = self.is_label_text[token_id] = True
            elif text:
                self.is_label[token_id] = self.is_space[token_id] = True
        self.eos = torch.zeros(size, dtype=torch.bool)
        self.eos[self.eos_id] = True
        self.label_end = self.is_separator | self.eos
        # The first corner may not be the last bin, or no second corner could be larger.
        self.loc_first = self.is_loc & (self.loc_bin < LOC_BINS - 1)
        # Host-side copies for the per-token state updates: looking a token up in a tensor costs an op
        # (and a device sync on a GPU) per row per step.
        self.loc_bin_of = {int(t): b for b, t in enumerate(loc_ids)}
        self.separator_ids = frozenset(self.is_separator.nonzero().flatten().tolist())
        self.space_ids = frozenset(self.is_space.nonzero().flatten().tolist())

    def to(self, device) -> Vocabulary:
        for name, value in vars(self).items():
            if isinstance(value, torch.Tensor):
                setattr(self, name, value.to(device))
        return self


def min_object_tokens(task: str) -> int:
    """The fewest tokens a complete object takes: 4 locs, 16 codes when segmenting, 1 label token."""
    return 4 + (CODES_PER_MASK if task == "segment" else 0) + 1


class _Row:
    def __init__(self, spec: RowSpec):
        self.spec = spec
        self.state = _START
        self.count = 0  # codes so far in the current seg run, or label tokens so far
        self.corner: list[int] = []  # loc bins so far of the current object
        self.label: list[int] = []  # label tokens so far of the current object
        self.after_separator = False
        self.logprobs: list[float] = []

    def advance(self, token: int, vocab: Vocabulary) -> None:
        if self.state == _DONE:
            return
        if token == vocab.eos_id:
            self.state = _DONE
        elif self.state in (_START, _LOC) and token in vocab.loc_bin_of:
            if self.state == _START:
                self.corner, self.label = [], []
            self.state = _LOC
            self.corner.append(vocab.loc_bin_of[token])
            if len(self.corner) == 4:
                self.state = _SEG if self.spec.task == "segment" else _LABEL_FIRST
        elif self.state == _SEG:
            self.count += 1
            if self.count == CODES_PER_MASK:
                self.count = 0
                self.state = _LABEL_FIRST
        elif self.state == _LABEL_FIRST:
            self.state, self.count, self.label = _LABEL, 1, [token]
        elif self.state == _LABEL and token in vocab.separator_ids:
            self.state, self.after_separator, self.count = _START, True, 0
        elif self.state == _LABEL:
            self.count += 1
            self.label.append(token)
        elif self.state == _START and token in vocab.space_ids:
            self.after_separator = False  # one space, then the next object or the end

    def allowed(self, vocab: Vocabulary, generated: int) -> torch.Tensor | None:
        """The tokens this row may emit next, or None for no constraint."""
        if self.state == _DONE or generated >= self.spec.budget:
            return vocab.eos
        if not self.spec.constrained:
            return None
        if self.state == _START:
            shortest_label = min(map(len, self.spec.allowed_labels)) if self.spec.allowed_labels else 1
            if self.spec.budget - generated < min_object_tokens(self.spec.task) - 1 + shortest_label:
                return vocab.eos
            allowed = vocab.loc_first | vocab.eos
            return allowed | vocab.is_space if self.after_separator else allowed
        if self.state == _LOC:
            if len(self.corner) >= 2:  # y2 > y1, x2 > x1
                return vocab.is_loc & (vocab.loc_bin > self.corner[-2])
            return vocab.loc_first
        if self.state == _SEG:
            return vocab.is_seg
        if self.spec.allowed_labels is not None and self.state in (_LABEL_FIRST, _LABEL):
            return self._label_continuations(vocab, self.spec.budget - generated)
        if self.state == _LABEL_FIRST:
            return vocab.is_label_text
        if self.count >= self.spec.max_label_tokens:
            return vocab.label_end
        return vocab.is_label | vocab.label_end

    def _label_continuations(self, vocab: Vocabulary, remaining: int) -> torch.Tensor:
        """The next tokens of the allowed labels that start with this label's tokens so far and fit in
        the `remaining` budget, and the end of the label once it is a whole allowed label."""
        done = tuple(self.label) if self.state == _LABEL else ()
        allowed = torch.zeros_like(vocab.eos)
        following = [seq[len(done)] for seq in self.spec.allowed_labels
                     if len(done) < len(seq) <= len(done) + remaining and seq[:len(done)] == done]
        allowed[following] = True
        return allowed | vocab.label_end if done in self.spec.allowed_labels else allowed


class ObjectGrammar(LogitsProcessor):
    """Per-row grammar and budget for one `generate` call; records emitted tokens' probabilities."""

    def __init__(self, vocab: Vocabulary, rows: list[RowSpec], prompt_length: int):
        self.vocab = vocab
        self.rows = [_Row(spec) for spec in rows]
        self.prompt_length = prompt_length
        self._previous_logprobs: torch.Tensor | None = None
        self._recorded_steps = 0

    def _record(self, tokens: torch.Tensor) -> None:
        """Log-probabilities of the tokens just chosen, under the previous step's raw distribution."""
        if self._previous_logprobs is None:
            return
        self._recorded_steps += 1
        tokens = tokens.to(self._previous_logprobs.device)
        chosen = self._previous_logprobs.gather(1, tokens[:, None])[:, 0]
        # One transfer to the host per step for both the tokens and their log-probabilities.
        token_list, logprob_list = torch.stack([tokens.to(chosen.dtype), chosen]).tolist()
        for row, token, logprob in zip(self.rows, map(int, token_list), logprob_list):
            if row.state != _DONE:
                row.logprobs.append(logprob)
                row.advance(token, self.vocab)

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        generated = input_ids.shape[1] - self.prompt_length
        if generated > 0:
            self._record(input_ids[:, -1])
        self._previous_logprobs = torch.log_softmax(scores.float(), dim=-1)
        masks = [row.allowed(self.vocab, generated) for row in self.rows]
        if all(m is None for m in masks):
            return scores
        full = torch.stack([torch.ones_like(self.vocab.eos) if m is None else m for m in masks])
        return scores.masked_fill(~full.to(scores.device), float("-inf"))

    def finish(self, sequences: torch.Tensor) -> list[list[float]]:
        """Record the last step and return, per row, the log-probability of each emitted token.

        `sequences` are the generated ids only (prompt removed). A row's list covers its tokens up to
        and including its end-of-sequence token.
        """
        if sequences.shape[1] == self._recorded_steps + 1:
            # generate() stops without calling the processors for the last chosen token.
            self._record(sequences[:, -1])
        return [row.logprobs for row in self.rows]
