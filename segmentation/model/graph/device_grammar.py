"""The object grammar of `grammar.py` as tensors: a state per row, masks per state, updates without the host.

`ObjectGrammar` (the host grammar, kept as the reference) walks a Python state machine per row and
costs a device-to-host copy every step. Here the same machine is a handful of `[B]` integer tensors
updated with `torch.where`, and the allowed tokens of a step are gathered from a small table of
per-state masks, so a whole decode step (forward, mask, argmax, state advance) can run as one CUDA
graph with no host synchronisation. Every operation has a fixed shape for a given batch size.

`labels_from_prompt` rows also walk a trie of their allowed label token sequences: `[B, E]` edge
tensors (parent node, token, child node, length of the shortest whole label through the child),
padded to a fixed edge capacity per row so that the shapes do not depend on the prompt.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..grammar import RowSpec, Vocabulary, min_object_tokens
from ..tokens import CODES_PER_MASK

# The host grammar's states (grammar.py), same numbers.
START, LOC, SEG, LABEL_FIRST, LABEL, DONE = range(6)

# Rows of the per-state mask table.
(_EOS, _START, _START_AFTER_SEPARATOR, _LOC_FIRST, _SEG, _LABEL_TEXT, _LABEL_END, _LABEL_ANY, _ALL,
 _NONE) = range(10)

# Room for the label trie of one row (edges = tokens of its distinct class prefixes).
DEFAULT_EDGES_PER_ROW = 256


def trie_size(spec: RowSpec) -> int:
    """How many trie edges (= non-root nodes) a row's allowed labels need; 0 without them."""
    if spec.allowed_labels is None:
        return 0
    return len({seq[:depth] for seq in spec.allowed_labels for depth in range(1, len(seq) + 1)})


class GrammarTables:
    """What every batch shares: the per-state masks [C, V + 1] and per-token facts [V], on one device.

    Column V of the masks is a spare one that is always False: trie edges that do not apply write there.
    """

    def __init__(self, vocab: Vocabulary, device: torch.device | str):
        width = vocab.eos.shape[0]
        spare = torch.zeros(1, dtype=torch.bool, device=vocab.eos.device)
        rows = {
            _EOS: vocab.eos, _START: vocab.loc_first | vocab.eos,
            _START_AFTER_SEPARATOR: vocab.loc_first | vocab.eos | vocab.is_space, _LOC_FIRST: vocab.loc_first,
            _SEG: vocab.is_seg, _LABEL_TEXT: vocab.is_label_text, _LABEL_END: vocab.label_end,
            _LABEL_ANY: vocab.is_label | vocab.label_end, _ALL: torch.ones_like(vocab.eos),
            _NONE: torch.zeros_like(vocab.eos),
        }
        self.masks = torch.stack([torch.cat([rows[i], spare]) for i in range(len(rows))]).to(device)
        self.width = width
        self.eos_id = vocab.eos_id
        self.is_loc = vocab.is_loc.to(device)
        self.loc_bin = vocab.loc_bin.to(device)
        self.is_separator = vocab.is_separator.to(device)
        self.is_space = vocab.is_space.to(device)
        self.label_end = vocab.label_end.to(device)


@dataclass
class RowConstants:
    """Per-row facts that do not change during a generation, [B] each (tries [B, E] and [B, N])."""

    budget: torch.Tensor  # long: the row's own max_new_tokens
    is_segment: torch.Tensor  # bool: 16 mask codes follow the four locations
    constrained: torch.Tensor  # bool: the grammar applies (else only the budget does)
    max_label: torch.Tensor  # long: label tokens before only ` ;` or the end may follow
    min_start: torch.Tensor  # long: the fewest tokens left for which a new object may start
    has_labels: torch.Tensor  # bool: labels must be one of the row's allowed sequences
    edge_parent: torch.Tensor  # long [B, E]: trie node an edge leaves (-2: unused edge)
    edge_token: torch.Tensor  # long [B, E]
    edge_child: torch.Tensor  # long [B, E]
    edge_shortest: torch.Tensor  # long [B, E]: tokens of the shortest whole label through the child
    node_depth: torch.Tensor  # long [B, N]: tokens from the root (node 0) to the node
    node_whole: torch.Tensor  # bool [B, N]: the path to the node is a whole allowed label


@dataclass
class RowState:
    """What changes each step, [B] each: the host grammar's `_Row` fields as integers."""

    state: torch.Tensor
    count: torch.Tensor  # codes so far of the current seg run, or label tokens so far
    corners: torch.Tensor  # location bins so far of the current object (0..4)
    corner_y1: torch.Tensor
    corner_x1: torch.Tensor
    after_separator: torch.Tensor  # bool
    node: torch.Tensor  # trie node of the label so far (-1: off the trie)
    generated: torch.Tensor  # tokens emitted so far


def _fields(obj) -> dict[str, torch.Tensor]:
    return dict(vars(obj))


def compile_rows(specs: list[RowSpec], *, edges_per_row: int = DEFAULT_EDGES_PER_ROW,
                 device: torch.device | str = "cpu") -> RowConstants:
    """The rows' specs as tensors; tries padded to `edges_per_row` edges (a larger need raises)."""
    need = max((trie_size(s) for s in specs), default=0)
    if need > edges_per_row:
        raise ValueError(f"a row's allowed labels need {need} trie edges, more than the {edges_per_row} reserved")
    batch, nodes = len(specs), edges_per_row + 1
    edge_parent = torch.full((batch, edges_per_row), -2, dtype=torch.long)
    edge_token = torch.zeros((batch, edges_per_row), dtype=torch.long)
    edge_child = torch.zeros((batch, edges_per_row), dtype=torch.long)
    edge_shortest = torch.zeros((batch, edges_per_row), dtype=torch.long)
    node_depth = torch.zeros((batch, nodes), dtype=torch.long)
    node_whole = torch.zeros((batch, nodes), dtype=torch.bool)
    min_start = []
    for row, spec in enumerate(specs):
        shortest_label = min(map(len, spec.allowed_labels)) if spec.allowed_labels else 1
        min_start.append(min_object_tokens(spec.task) - 1 + shortest_label)
        if spec.allowed_labels is None:
            continue
        ids: dict[tuple[int, ...], int] = {(): 0}
        shortest: dict[tuple[int, ...], int] = {}
        for seq in spec.allowed_labels:
            for depth in range(1, len(seq) + 1):
                prefix = seq[:depth]
                shortest[prefix] = min(shortest.get(prefix, len(seq)), len(seq))
        node_whole[row, 0] = () in spec.allowed_labels
        for edge, prefix in enumerate(sorted(shortest, key=lambda p: (len(p), p))):
            child = ids[prefix] = len(ids)
            edge_parent[row, edge] = ids[prefix[:-1]]
            edge_token[row, edge] = prefix[-1]
            edge_child[row, edge] = child
            edge_shortest[row, edge] = shortest[prefix]
            node_depth[row, child] = len(prefix)
            node_whole[row, child] = prefix in spec.allowed_labels

    def tensor(values, dtype=torch.long):
        return torch.tensor(values, dtype=dtype)

    constants = RowConstants(
        budget=tensor([s.budget for s in specs]),
        is_segment=tensor([s.task == "segment" for s in specs], torch.bool),
        constrained=tensor([s.constrained for s in specs], torch.bool),
        max_label=tensor([s.max_label_tokens for s in specs]),
        min_start=tensor(min_start),
        has_labels=tensor([s.allowed_labels is not None for s in specs], torch.bool),
        edge_parent=edge_parent, edge_token=edge_token, edge_child=edge_child, edge_shortest=edge_shortest,
        node_depth=node_depth, node_whole=node_whole,
    )
    return RowConstants(**{k: v.to(device) for k, v in _fields(constants).items()})


def initial_state(batch: int, device: torch.device | str = "cpu") -> RowState:
    def zeros(dtype=torch.long):
        return torch.zeros(batch, dtype=dtype, device=device)

    return RowState(state=zeros(), count=zeros(), corners=zeros(), corner_y1=zeros(), corner_x1=zeros(),
                    after_separator=zeros(torch.bool), node=zeros() - 1, generated=zeros())


def copy_rows(target, source, rows: torch.Tensor | slice | None = None) -> None:
    """Copy every tensor field of `source` into `target`'s tensors in place (at `rows` if given):
    CUDA graphs replay over fixed memory, so new values go into the captured tensors."""
    for name, value in _fields(source).items():
        destination = getattr(target, name)
        if rows is None:
            destination.copy_(value)
        else:
            destination[rows] = value


def allowed_tokens(tables: GrammarTables, rows: RowConstants, state: RowState) -> torch.Tensor:
    """The tokens each row may emit next, bool [B, V]: `_Row.allowed` of grammar.py for every row at once."""
    remaining = rows.budget - state.generated
    at = state.state
    end_only = (at == DONE) | (remaining <= 0)
    free = ~rows.constrained
    starting = at == START
    start_class = torch.where(state.after_separator, _START_AFTER_SEPARATOR, _START)
    start_class = torch.where(remaining < rows.min_start, _EOS, start_class)
    in_label = (at == LABEL_FIRST) | (at == LABEL)
    by_trie = rows.has_labels & in_label
    label_class = torch.where(state.count >= rows.max_label, _LABEL_END, _LABEL_ANY)
    label_class = torch.where(at == LABEL_FIRST, _LABEL_TEXT, label_class)
    locating = at == LOC
    after_two = locating & (state.corners >= 2)

    cls = torch.full_like(at, _NONE)
    cls = torch.where(starting, start_class, cls)
    cls = torch.where(locating & ~after_two, _LOC_FIRST, cls)
    cls = torch.where(at == SEG, _SEG, cls)
    cls = torch.where(in_label & ~by_trie, label_class, cls)
    cls = torch.where(free, _ALL, cls)
    cls = torch.where(end_only, _EOS, cls)
    constrained_here = rows.constrained & ~end_only
    mask = tables.masks.index_select(0, cls)  # [B, V + 1]

    # Second and later corners: a location bin above the matching first corner (y2 > y1, x2 > x1).
    threshold = torch.where(state.corners == 2, state.corner_y1, state.corner_x1)
    above = tables.is_loc & (tables.loc_bin > threshold[:, None])  # [B, V]
    mask[:, :-1] |= above & (after_two & constrained_here)[:, None]

    # Labels from the prompt: the next token of every allowed label that extends this label and fits.
    trie_rows = by_trie & constrained_here
    node = torch.where(at == LABEL_FIRST, torch.zeros_like(state.node), state.node)
    on_trie = node >= 0
    node_index = node.clamp(min=0)[:, None]
    depth = rows.node_depth.gather(1, node_index)[:, 0]
    fits = rows.edge_shortest <= (depth + remaining)[:, None]
    applies = (rows.edge_parent == node[:, None]) & fits & (trie_rows & on_trie)[:, None]
    spare = tables.width
    mask.scatter_(1, torch.where(applies, rows.edge_token, spare), True)
    whole = rows.node_whole.gather(1, node_index)[:, 0] & on_trie & trie_rows
    mask[:, :-1] |= tables.label_end & whole[:, None]
    return mask[:, :-1]


def _trie_child(rows: RowConstants, node: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """The child of `node` by `tokens` per row, or -1 where the trie has no such edge."""
    match = (rows.edge_parent == node[:, None]) & (rows.edge_token == tokens[:, None])
    child = (rows.edge_child * match).sum(1)
    return torch.where(match.any(1), child, -1)


def advance(tables: GrammarTables, rows: RowConstants, state: RowState, tokens: torch.Tensor) -> None:
    """Move every row's state past its chosen token, in place: `_Row.advance` of grammar.py.

    tokens long [B]. The branches of the host grammar are tried in its order; exactly one (or none) of
    them applies to a row, so each is a mask and the updates are `torch.where`s.
    """
    at = state.state
    live = (at != DONE) & (tokens != tables.eos_id)
    ends = (at != DONE) & (tokens == tables.eos_id)
    is_loc = tables.is_loc[tokens]
    locates = live & ((at == START) | (at == LOC)) & is_loc
    codes = live & (at == SEG)
    label_starts = live & (at == LABEL_FIRST)
    separates = live & (at == LABEL) & tables.is_separator[tokens]
    labels = live & (at == LABEL) & ~tables.is_separator[tokens]
    spaces = live & (at == START) & ~is_loc & tables.is_space[tokens]

    corners_before = torch.where(at == START, 0, state.corners)
    bin_ = tables.loc_bin[tokens]
    corners = corners_before + 1
    after_corners = torch.where(rows.is_segment, SEG, LABEL_FIRST)
    new_state = torch.where(locates, torch.where(corners == 4, after_corners, LOC), at)
    count = state.count + 1
    new_state = torch.where(codes & (count == CODES_PER_MASK), LABEL_FIRST, new_state)
    new_count = torch.where(codes, torch.where(count == CODES_PER_MASK, 0, count), state.count)
    new_state = torch.where(label_starts, LABEL, new_state)
    new_count = torch.where(label_starts, 1, new_count)
    new_state = torch.where(separates, START, new_state)
    new_count = torch.where(separates, 0, new_count)
    new_count = torch.where(labels, count, new_count)
    new_state = torch.where(ends, DONE, new_state)

    parent = torch.where(label_starts, torch.zeros_like(state.node), state.node)
    node = torch.where(label_starts | labels, _trie_child(rows, parent, tokens), state.node)

    state.corner_y1.copy_(torch.where(locates & (corners_before == 0), bin_, state.corner_y1))
    state.corner_x1.copy_(torch.where(locates & (corners_before == 1), bin_, state.corner_x1))
    state.corners.copy_(torch.where(locates, corners, state.corners))
    state.after_separator.copy_(torch.where(separates, True, torch.where(spaces, False, state.after_separator)))
    state.node.copy_(node)
    state.count.copy_(new_count)
    state.state.copy_(new_state)
    state.generated.add_(1)
