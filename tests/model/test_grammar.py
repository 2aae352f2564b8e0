"""The grammar state machine driven by random logits (no model): every row must stay well formed."""

import re

import numpy as np
import pytest
import torch

from segmentation.model.grammar import ObjectGrammar, RowSpec, Vocabulary, min_object_tokens
from segmentation.model.tokens import parse_objects


def run_grammar(vocab, rows, seed, eos_bias=0.0):
    """Greedy 'generation' from random logits through the processor; returns ids per row and logprobs."""
    generator = torch.Generator().manual_seed(seed)
    prompt = torch.full((len(rows), 3), 2)
    ids = prompt
    grammar = ObjectGrammar(vocab, rows, prompt_length=3)
    finished = torch.zeros(len(rows), dtype=torch.bool)
    for _ in range(max(r.budget for r in rows) + 1):
        scores = torch.randn(len(rows), vocab.eos.shape[0], generator=generator) * 3
        scores[:, vocab.eos_id] += eos_bias
        chosen = grammar(ids, scores).argmax(-1)
        chosen = torch.where(finished, torch.zeros_like(chosen), chosen)  # pad after the end, as generate()
        ids = torch.cat([ids, chosen[:, None]], dim=1)
        finished |= chosen == vocab.eos_id
        if finished.all():
            break
    generated = ids[:, 3:]
    return generated, grammar.finish(generated)


def row_text(tokenizer, ids, eos_id):
    ids = ids.tolist()
    return tokenizer.decode(ids[: ids.index(eos_id)] if eos_id in ids else ids, skip_special_tokens=True)


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("eos_bias", [0.0, 6.0])
def test_constrained_rows_are_well_formed(tokenizer, vocab, seed, eos_bias):
    rows = [RowSpec("segment", 120, max_label_tokens=5), RowSpec("detect", 40, max_label_tokens=3),
            RowSpec("segment", 21), RowSpec("detect", 4)]
    generated, logprobs = run_grammar(vocab, rows, seed, eos_bias)
    for spec, ids, lps in zip(rows, generated, logprobs):
        text = row_text(tokenizer, ids, vocab.eos_id)
        objects = parse_objects(text)
        emitted = ids.tolist()
        n = emitted.index(vocab.eos_id) + 1 if vocab.eos_id in emitted else len(emitted)
        assert n <= spec.budget + 1
        assert len(lps) == n and all(lp <= 0.0 for lp in lps)
        for obj in objects:
            y1, x1, y2, x2 = obj.locs
            assert y2 > y1 and x2 > x1
            assert (obj.codes is not None) == (spec.task == "segment")
            assert obj.label.strip()
        # Nothing but objects, separators and spaces.
        leftover = text
        for obj in reversed(objects):
            leftover = leftover[: obj.span[0]] + leftover[obj.span[1]:]
        assert re.fullmatch(r"[ ;]*", leftover), (text, leftover)
        if spec.budget < min_object_tokens(spec.task):
            assert objects == []


def test_budget_forces_the_end_and_unconstrained_rows_are_free(tokenizer, vocab):
    rows = [RowSpec("segment", 7, constrained=False), RowSpec("segment", 30, constrained=False)]
    generated, _ = run_grammar(vocab, rows, seed=1)
    first = generated[0].tolist()
    assert first[7] == vocab.eos_id and vocab.eos_id not in first[:7]
    # Random logits without the grammar pick tokens of every kind, e.g. byte or special pieces.
    assert not all(bool(vocab.is_loc[t]) for t in generated[1, :30].tolist())


def test_labels_stop_at_their_cap(tokenizer, vocab):
    rows = [RowSpec("detect", 200, max_label_tokens=2)]
    generated, _ = run_grammar(vocab, rows, seed=3)
    text = row_text(tokenizer, generated[0], vocab.eos_id)
    for obj in parse_objects(text):
        assert len(tokenizer(obj.label, add_special_tokens=False).input_ids) <= 3  # leading-space merge


def test_vocabulary_requires_paligemma_tokens():
    from transformers import GemmaTokenizer

    plain = GemmaTokenizer()  # no <loc>/<seg> tokens
    with pytest.raises(ValueError, match="loc"):
        Vocabulary(plain, len(plain))


CLASSES = ["cat", "the man on the left", "zebra crossing", "ünïcode", "car"]


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("budget", [200, 27, 40])
def test_labels_from_prompt_are_exactly_the_classes(tokenizer, vocab, seed, budget):
    allowed = tuple(tuple(tokenizer(" " + c, add_special_tokens=False).input_ids) for c in CLASSES)
    rows = [RowSpec("segment", budget, allowed_labels=allowed), RowSpec("detect", budget, allowed_labels=allowed[1:3]),
            RowSpec("detect", budget)]
    generated, _ = run_grammar(vocab, rows, seed)
    texts = [row_text(tokenizer, ids, vocab.eos_id) for ids in generated]
    restricted = [parse_objects(t) for t in texts[:2]]
    assert restricted[0] or budget < 21, texts[0]  # random logits pick the end now and then, not always
    assert all(o.label in CLASSES for o in restricted[0]), texts[0]
    assert all(o.label in CLASSES[1:3] for o in restricted[1]), texts[1]
    # Without the option random logits write labels that are none of the classes.
    assert any(o.label not in CLASSES for o in parse_objects(texts[2])) or budget < 21


def test_labels_from_prompt_only_start_an_object_whose_label_fits(tokenizer, vocab):
    long_only = (tuple(tokenizer(" the man on the left", add_special_tokens=False).input_ids),)  # 5 tokens
    for seed in range(4):
        generated, _ = run_grammar(vocab, [RowSpec("detect", 8, allowed_labels=long_only)], seed, eos_bias=-20)
        text = row_text(tokenizer, generated[0], vocab.eos_id)
        assert [o.label for o in parse_objects(text)] in ([], ["the man on the left"]), text
        generated, _ = run_grammar(vocab, [RowSpec("detect", 9, allowed_labels=long_only)], seed, eos_bias=-20)
        assert [o.label for o in parse_objects(row_text(tokenizer, generated[0], vocab.eos_id))] == \
            ["the man on the left"]


def test_labels_from_prompt_batched_equals_solo(segmenter):
    """The real tiny model: the option on and off mixed in one batch, each row as it is alone."""
    from dataclasses import replace

    from PIL import Image

    from segmentation.model.prompts import parse_prompt

    rng = np.random.default_rng(4)
    images = [Image.fromarray(rng.integers(0, 255, (40 + 9 * i, 50, 3), dtype=np.uint8)) for i in range(4)]
    prompts = [replace(parse_prompt(p), labels_from_prompt=on) for p, on in
               [("cat ; dog", True), ("cat ; dog", False), ("the man on the left", True), ("bus", False)]]
    batched = segmenter.engine.generate(images, prompts)
    solo = [segmenter.engine.generate([image], [prompt])[0] for image, prompt in zip(images, prompts)]
    assert [g.token_ids for g in batched] == [g.token_ids for g in solo]
    for prompt, generation in zip(prompts, batched):
        labels = [o.label for o in parse_objects(generation.text)]
        if prompt.labels_from_prompt:
            assert labels and set(labels) <= set(prompt.classes), generation.text
    assert any(o.label not in ("cat", "dog") for o in parse_objects(batched[1].text)), batched[1].text
