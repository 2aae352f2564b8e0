"""The grammar on the device (segmentation/model/graph/device_grammar.py) against the host grammar
(grammar.py, the reference): driven by the same random logits, every row is allowed the same tokens at
every step, so both choose the same tokens."""

import pytest
import torch

from segmentation.model.grammar import ObjectGrammar, RowSpec
from segmentation.model.graph.device_grammar import (
    GrammarTables,
    advance,
    allowed_tokens,
    compile_rows,
    initial_state,
    trie_size,
)


def labels(tokenizer, *classes):
    return tuple(tuple(tokenizer(" " + c, add_special_tokens=False).input_ids) for c in classes)


def row_specs(tokenizer):
    """Every kind of row: tasks, tight and loose budgets, short labels, no grammar, allowed labels with
    shared prefixes and of different lengths."""
    return [
        RowSpec("segment", 60),
        RowSpec("detect", 31, max_label_tokens=2),
        RowSpec("segment", 23),  # room for one object only
        RowSpec("detect", 40, constrained=False),
        RowSpec("detect", 50, allowed_labels=labels(tokenizer, "cat", "car", "the man on the left")),
        RowSpec("segment", 70, allowed_labels=labels(tokenizer, "red bus", "red", "bird")),
        RowSpec("detect", 9, allowed_labels=labels(tokenizer, "the man on the left", "dog")),
        RowSpec("detect", 4),  # too short for any object
    ]


def biased_scores(vocab, generator, batch):
    """Random logits that favour the tokens which move the grammar (separators, spaces, the end)."""
    scores = torch.randn(batch, vocab.eos.shape[0], generator=generator) * 3
    scores += vocab.is_separator * 2.5 + vocab.is_space * 1.0 + vocab.eos * 0.5
    return scores


@pytest.mark.parametrize("seed", range(6))
def test_device_grammar_allows_what_the_host_grammar_allows(tokenizer, vocab, seed):
    specs = row_specs(tokenizer)
    tables = GrammarTables(vocab, "cpu")
    rows, state = compile_rows(specs), initial_state(len(specs))
    host = ObjectGrammar(vocab, specs, prompt_length=1)
    ids = torch.zeros(len(specs), 1, dtype=torch.long)
    generator = torch.Generator().manual_seed(seed)
    visited = set()
    for step in range(max(s.budget for s in specs) + 1):
        scores = biased_scores(vocab, generator, len(specs))
        host_masked = host(ids, scores.clone())
        host_allowed = torch.isfinite(host_masked)
        device_allowed = allowed_tokens(tables, rows, state)
        for row, spec in enumerate(specs):
            assert torch.equal(device_allowed[row], host_allowed[row]), (seed, step, row, spec)
        tokens = scores.masked_fill(~device_allowed, float("-inf")).argmax(-1)
        visited.update(r.state for r in host.rows)
        advance(tables, rows, state, tokens)
        ids = torch.cat([ids, tokens[:, None]], dim=1)
    host._record(ids[:, -1])  # the host grammar's states after the last token
    assert state.state.tolist() == [r.state for r in host.rows]
    assert len(visited) == 6  # every state was reached by some row


def test_tries_hold_each_distinct_prefix_once(tokenizer):
    spec = RowSpec("detect", 50, allowed_labels=labels(tokenizer, "red bus", "red", "red bus"))
    [(red,)], [(red_, bus)] = labels(tokenizer, "red"), labels(tokenizer, "red bus")
    assert red == red_
    assert trie_size(spec) == 2
    rows = compile_rows([spec])
    assert rows.edge_parent[0, :2].tolist() == [0, 1] and rows.edge_token[0, :2].tolist() == [red, bus]
    assert rows.node_whole[0, :3].tolist() == [False, True, True]
    assert rows.edge_shortest[0, :2].tolist() == [1, 2]


def test_a_trie_larger_than_the_reserved_room_is_refused(tokenizer):
    many = labels(tokenizer, *[f"cat {i}" for i in range(60)])
    with pytest.raises(ValueError, match="trie edges"):
        compile_rows([RowSpec("detect", 500, allowed_labels=many)], edges_per_row=16)
