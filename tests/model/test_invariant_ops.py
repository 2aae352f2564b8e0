"""The batch-invariant mode registered for the CPU dispatch key under Triton's interpreter: PyTorch's
own functions (linear, matmul, softmax, layer_norm, conv2d, sdpa, mean) reach the kernels, give
PyTorch's answers, keep rows invariant, fall back for what the kernels do not take, and stop when
the mode is switched off."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from invariant_helpers import load_kernels

from segmentation.model import invariant
from segmentation.model.invariant import ops
from segmentation.model.invariant.interpreter import position_invariant_dot

kernels = load_kernels()


def randn(*shape, dtype=torch.float32, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


@pytest.fixture
def calls(monkeypatch):
    """Counts of kernel launches by name, while the mode is on for the CPU."""
    counts = {}

    def spy(name):
        real = getattr(kernels, name)

        def counted(*args, **kwargs):
            counts[name] = counts.get(name, 0) + 1
            return real(*args, **kwargs)

        monkeypatch.setattr(kernels, name, counted)

    for name in ("matmul", "softmax", "row_mean", "row_sum", "layer_norm"):
        spy(name)
    with invariant.batch_invariant("cpu"), position_invariant_dot():
        yield counts
    assert not invariant.is_enabled("cpu")


def reference(fn):
    """fn() with PyTorch's own kernels (the mode off for the duration)."""
    invariant.disable("cpu")
    try:
        return fn()
    finally:
        invariant.enable("cpu")


def test_pytorch_functions_reach_the_kernels_and_agree(calls):
    x, weight, bias = randn(2, 5, 48), randn(40, 48, seed=1), randn(40, seed=2)
    cases = {
        "linear 3-D": lambda: F.linear(x, weight, bias),  # addmm on the flattened rows
        "linear no bias": lambda: F.linear(x[0], weight),  # mm
        "matmul 4-D": lambda: torch.matmul(randn(2, 3, 5, 16), randn(2, 3, 16, 7, seed=1)),  # bmm
        "baddbmm": lambda: torch.baddbmm(randn(3, 1, 7), randn(3, 5, 16), randn(3, 16, 7, seed=1), beta=0.5,
                                         alpha=2.0),
        "softmax f32 of f16": lambda: F.softmax(x.half(), dim=-1, dtype=torch.float32),
        "log_softmax": lambda: F.log_softmax(x, dim=1),
        "rms": lambda: x.pow(2).mean(-1, keepdim=True),
        "mean dims": lambda: x.mean((0, 2)),
        "sum dim": lambda: x.sum(1),
        "layer_norm": lambda: F.layer_norm(x, (48,), randn(48, seed=3), randn(48, seed=4), 1e-6),
        "conv2d patches": lambda: F.conv2d(randn(2, 3, 28, 28), randn(8, 3, 14, 14, seed=1), randn(8), stride=14),
        "conv2d padded": lambda: F.conv2d(randn(1, 3, 9, 11), randn(4, 3, 3, 3, seed=1), padding=1, stride=2),
    }
    for name, case in cases.items():
        before = sum(calls.values())
        got, want = case(), reference(case)
        assert sum(calls.values()) > before, f"{name} did not reach a kernel"
        assert got.shape == want.shape and got.dtype == want.dtype, name
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4, msg=name)


@pytest.mark.parametrize("variant", ["plain", "bool mask", "additive mask", "causal", "gqa"])
def test_attention_agrees_with_pytorch(calls, variant):
    q, k, v = randn(2, 4, 9, 16), randn(2, 4, 11, 16, seed=1), randn(2, 4, 11, 8, seed=2)
    kwargs = {}
    if variant == "bool mask":
        mask = torch.rand(2, 1, 9, 11, generator=torch.Generator().manual_seed(3)) > 0.3
        mask[0, 0, 2] = False  # a row with every key masked: zeros, as PyTorch's attention
        kwargs["attn_mask"] = mask
    elif variant == "additive mask":
        kwargs["attn_mask"] = randn(9, 11, seed=3)
    elif variant == "causal":
        kwargs["is_causal"] = True
    elif variant == "gqa":
        k, v, kwargs["enable_gqa"] = k[:, :2], v[:, :2], True
    got = F.scaled_dot_product_attention(q, k, v, **kwargs)
    assert calls.get("softmax") and calls.get("matmul") == 2
    want = reference(lambda: F.scaled_dot_product_attention(q, k, v, **kwargs))
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    # The fallback (dropout, float64) answers the same.
    fallback = ops.scaled_dot_product_attention.fallback
    torch.testing.assert_close(reference(lambda: fallback(q, k, v, **kwargs)), want, atol=1e-5, rtol=1e-5)


def test_rows_are_invariant_through_pytorch(calls):
    # A linear layer, an RMSNorm and a log-softmax as a decode step meets them: rows alone == in a batch.
    x, weight = randn(33, 64), randn(300, 64, seed=1)

    def step(rows):
        normed = rows * torch.rsqrt(rows.pow(2).mean(-1, keepdim=True) + 1e-6)
        return F.log_softmax(F.linear(normed, weight), dim=-1)

    together = step(x)
    for i in (0, 1, 17, 32):
        assert torch.equal(step(x[i:i + 1])[0], together[i])


def test_unsupported_inputs_fall_back_to_pytorch(calls):
    a, b = randn(5, 6, dtype=torch.float64), randn(6, 7, dtype=torch.float64, seed=1)
    cases = {
        "mm f64": lambda: a @ b,
        "addmm f64": lambda: torch.addmm(b[0], a, b),
        "softmax f64": lambda: a.softmax(-1),
        "mean f64": lambda: a.mean(-1),
        "sum int": lambda: torch.arange(12).reshape(3, 4).sum(1),
        "layer_norm f64": lambda: F.layer_norm(a, (6,)),
        "grouped conv": lambda: F.conv2d(randn(1, 4, 6, 6), randn(4, 2, 3, 3, seed=1), groups=2),
        "attention f64": lambda: F.scaled_dot_product_attention(*(randn(1, 2, 3, 4, dtype=torch.float64, seed=s)
                                                                  for s in range(3))),
    }
    for name, case in cases.items():
        torch.testing.assert_close(case(), reference(case), msg=name)
    assert not calls.get("layer_norm") and not calls.get("row_mean")


def test_a_reentrant_call_takes_the_fallback(calls):
    # An override reached from inside another one goes to PyTorch's kernel, not back into Triton.
    ops._local.depth = 1
    try:
        a, b = randn(4, 5), randn(5, 3, seed=1)
        torch.testing.assert_close(a @ b, reference(lambda: a @ b))
        assert not calls.get("matmul")
    finally:
        ops._local.depth = 0


def test_disable_gives_the_operators_back(calls):
    a, b = randn(4, 5), randn(5, 3, seed=1)
    a @ b
    assert calls["matmul"] == 1
    invariant.disable("cpu")
    a @ b
    F.softmax(a, -1)
    assert calls["matmul"] == 1 and not calls.get("softmax")
    invariant.enable("cpu")  # for the fixture's own exit


def test_nested_contexts_leave_the_mode_as_found():
    with invariant.batch_invariant("cpu"):
        with invariant.batch_invariant("cpu"):
            pass
        assert invariant.is_enabled("cpu")  # the inner block found it on: left on
    assert not invariant.is_enabled("cpu")
