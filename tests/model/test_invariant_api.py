"""segmentation.model.invariant's public API without running a kernel: the environment switch,
availability, describe() and the list of covered operators."""

from __future__ import annotations

import pytest
import torch

from segmentation.model import invariant


def test_env_switch_is_opt_in():
    assert invariant.env_enabled({}) is False
    assert invariant.env_enabled({invariant.ENV: "0"}) is False
    assert invariant.env_enabled({invariant.ENV: " True "}) is True
    assert invariant.env_enabled({invariant.ENV: "on"}) is True
    with pytest.raises(ValueError, match=invariant.ENV):
        invariant.env_enabled({invariant.ENV: "maybe"})


def test_availability(monkeypatch):
    assert invariant.available("cuda") is (torch.cuda.is_available() and invariant.available("cuda:0"))
    assert invariant.available("mps") is False  # not a device type the mode knows
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert invariant.available("cpu") is False  # the CPU only under the interpreter
    with pytest.raises(RuntimeError, match="not available"):
        invariant.enable("cpu")
    assert not invariant.is_enabled("cpu")


def test_describe_says_where_batched_equals_solo(monkeypatch):
    assert "not guaranteed on cuda in bfloat16" in invariant.describe("cuda", torch.bfloat16)
    assert invariant.ENV in invariant.describe("cuda", torch.bfloat16)
    assert "pinned by the tests" in invariant.describe("cpu", torch.float32)
    monkeypatch.setattr(invariant, "is_enabled", lambda device_type="cuda": True)
    line = invariant.describe("cuda", torch.bfloat16)
    assert line.startswith("batched ≡ solo bit for bit on cuda in bfloat16") and "\n" not in line


def test_covered_operators_are_the_registered_ones():
    pytest.importorskip("triton")
    from segmentation.model.invariant.ops import OVERRIDES

    assert sorted(invariant.COVERED_OPS) == sorted(f"aten::{name}" for name in OVERRIDES)
    for name in OVERRIDES:  # each names a real aten operator overload
        packet, _, overload = name.partition(".")
        getattr(getattr(torch.ops.aten, packet), overload or "default")
