"""Batched ≡ solo bit for bit on the CPU where the graph engine isolates rows (engine.py `isolate_rows`):
bfloat16 (where one activation rounded differently changes later tokens), and float32 with
SEG_BATCH_INVARIANT. Each request is prefilled alone at its own length; where this CPU's kernels compute a
decode-step row differently at different batch sizes (the start-up check, `StaticDecoder.row_arithmetic`)
every step also computes all slots over the whole cache (`fixed batch`). Both arrangements are pinned here:
the one this CPU's check picks, and `fixed batch` forced (what a CPU whose kernels depend on the batch size,
e.g. oneDNN's AMX kernels, runs; measured here only with this CPU's kernels).

`SEG_DTYPE=auto`: bfloat16 only on CPUs with native bfloat16 (AMX or AVX-512 BF16), and float32 if the
check finds that rows cannot be isolated there.
"""

from __future__ import annotations

import logging

import pytest
import torch
from pictures import random_image

from segmentation.model import cpu
from segmentation.model import engine as engine_module
from segmentation.model.engine import PaliGemmaEngine, auto_dtype
from segmentation.model.graph.decoder import GraphSettings, StaticDecoder
from segmentation.model.prompts import parse_prompt
from segmentation.model.segmenter import parse_generations

BUDGET = 40  # tokens per row: short, for the suite's time; the prompts still differ in length
NATIVE = {"model": "Intel Xeon (test)", "capability": "AVX512", "native_bfloat16": True, "via": "AMX", "flags": []}
NOT_NATIVE = {"model": "AMD EPYC (test)", "capability": "AVX2", "native_bfloat16": False, "via": None, "flags": []}


def requests(count: int = 4):
    texts = ("cat", "dog ; cat", "the man on the left", "bird ; tree ; sky")
    return ([random_image(80 + i, 70, i) for i in range(count)], [parse_prompt(texts[i % 4]) for i in range(count)])


def refuted(self, seed=0):
    """The start-up check of a CPU whose kernels compute a row differently by its place: nothing isolates rows."""
    return {"any_batch": False, "fixed_batch": False}


def force_fixed_batch(monkeypatch) -> None:
    """The start-up check reports what a CPU whose kernels depend on the batch size would (any_batch false)."""
    real = StaticDecoder.row_arithmetic
    monkeypatch.setattr(StaticDecoder, "row_arithmetic",
                        lambda self, seed=0: {**real(self, seed), "any_batch": False, "fixed_batch": True})


# Plain bfloat16 with this CPU's arrangement: the equality test (tests/model/test_batched_solo_cpu.py).
@pytest.mark.parametrize("mode", ["bfloat16, fixed batch", "float32, batch-invariant"])
def test_isolated_rows_are_the_same_bits_alone_and_in_a_batch(tiny_fixtures, mode, monkeypatch):
    if "fixed batch" in mode:
        force_fixed_batch(monkeypatch)
    engine = PaliGemmaEngine.from_pretrained(tiny_fixtures / "paligemma", generation="graph",
                                             dtype=mode.split(",")[0], batch_invariant="batch-invariant" in mode,
                                             graph=GraphSettings(buckets=(1, 2, 4)), max_new_tokens=BUDGET)
    decoder = engine.decoder
    assert engine.isolate_rows and decoder.per_row_prefill
    assert engine.row_isolation in (("fixed batch",) if "fixed batch" in mode else ("any batch", "fixed batch"))
    if engine.row_isolation == "fixed batch":
        assert decoder.batch_for(1) == decoder.slots == 4 and decoder.span == decoder.length
    images, prompts = requests()
    together = parse_generations(engine, images, prompts)
    alone = [parse_generations(engine, [image], [prompt])[0] for image, prompt in zip(images, prompts)]
    for batched, solo in zip(together, alone):
        assert batched.generation.token_ids == solo.generation.token_ids
        assert batched.generation.token_logprobs == solo.generation.token_logprobs  # the same bits
        assert batched.scores == solo.scores
    assert sum(len(p.objects) for p in together) >= 2
    assert engine.invariance().startswith(f"batched ≡ solo bit for bit on cpu in {mode.split(',')[0]}")
    described = engine.describe()
    assert described["cpu"]["row_isolation"] == engine.row_isolation and described["dtype"] == mode.split(",")[0]


def test_without_native_bfloat16_auto_is_todays_float32_engine(tiny_fixtures, monkeypatch):
    """The default on CPUs without native bfloat16 is today's engine, untouched: no row check, no isolation."""
    monkeypatch.setattr(engine_module, "cpu_info", lambda: NOT_NATIVE)
    engine = PaliGemmaEngine.from_pretrained(tiny_fixtures / "paligemma", generation="graph",
                                             graph=GraphSettings(buckets=(1, 2, 4)), max_new_tokens=BUDGET)
    assert engine.model.dtype == torch.float32 and "no native bfloat16" in engine.dtype_reason
    assert not engine.isolate_rows and engine.row_check is None
    assert not engine.decoder.per_row_prefill and engine.decoder.batch_for(1) == 1
    assert engine.describe()["cpu"] == {**{k: NOT_NATIVE[k] for k in ("model", "capability", "native_bfloat16", "via")},
                                        "row_isolation": None}


def test_the_row_check_catches_a_kernel_that_depends_on_the_batch(tiny_fixtures, monkeypatch):
    """A stand-in for a kernel that sums a row differently by batch size (a last-bit nudge per row count):
    the check must say so, and `auto` then stays in float32 on a CPU with native bfloat16."""
    monkeypatch.setattr(engine_module, "cpu_info", lambda: NATIVE)
    engine = PaliGemmaEngine.from_pretrained(tiny_fixtures / "paligemma", generation="graph",
                                             graph=GraphSettings(buckets=(1, 2, 4)), max_new_tokens=BUDGET)
    assert engine.model.dtype == torch.bfloat16 and engine.row_isolation is not None  # auto: native here
    head = engine.model.lm_head
    original = head.forward
    head.forward = lambda x: original(x) * (1 + 2.0**-4 * (x.shape[0] - 1))  # a few bits, by row count
    check = engine.decoder.row_arithmetic()
    assert check == {"any_batch": False, "fixed_batch": True}  # a fixed row count still isolates rows

    def by_position(x):  # a nudge by the row's place; x: [rows, 1, hidden] in the step (rows first in any shape)
        return original(x) + (torch.arange(x.shape[0], dtype=x.dtype) * 2.0**-6).view(-1, *x.shape[1:-1], 1)

    head.forward = by_position
    check = engine.decoder.row_arithmetic()
    assert check == {"any_batch": False, "fixed_batch": False}  # by position: nothing isolates rows
    head.forward = original


def test_auto_picks_bfloat16_only_on_cpus_with_native_bfloat16():
    assert auto_dtype("cuda", "graph")[0] == torch.bfloat16
    assert auto_dtype("cpu", "graph", NOT_NATIVE) == (torch.float32, "auto: float32, this CPU has no native "
                                                      "bfloat16 (AVX2; PyTorch's reference bfloat16 kernels make "
                                                      "the prefill about 4x float32's)")
    assert auto_dtype("cpu", "graph", NATIVE) == (torch.bfloat16, "auto: bfloat16, native on this CPU (AMX)")
    assert auto_dtype("cpu", "fast", NATIVE)[0] == torch.float32  # only the graph engine isolates rows


def test_auto_falls_back_to_float32_when_rows_cannot_be_isolated(tiny_fixtures, monkeypatch, caplog):
    monkeypatch.setattr(engine_module, "cpu_info", lambda: NATIVE)
    monkeypatch.setattr(StaticDecoder, "row_arithmetic", refuted)
    with caplog.at_level(logging.WARNING, logger="segmentation.model.engine"):
        engine = PaliGemmaEngine.from_pretrained(tiny_fixtures / "paligemma", generation="graph",
                                                 graph=GraphSettings(buckets=(1, 2)), max_new_tokens=BUDGET)
    assert engine.model.dtype == torch.float32 and next(engine.model.parameters()).dtype == torch.float32
    assert "start-up check" in engine.dtype_reason and "cannot keep batched ≡ solo" in caplog.text
    assert not engine.isolate_rows and not engine.decoder.per_row_prefill  # float32: today's engine
    images, prompts = requests(2)
    assert len(engine.generate(images, prompts)) == 2


def test_an_explicit_bfloat16_the_check_refutes_is_served_and_says_so(tiny_fixtures, monkeypatch):
    monkeypatch.setattr(StaticDecoder, "row_arithmetic", refuted)
    engine = PaliGemmaEngine.from_pretrained(tiny_fixtures / "paligemma", generation="graph", dtype="bfloat16",
                                             graph=GraphSettings(buckets=(1, 2)), max_new_tokens=BUDGET)
    engine.decoder  # noqa: B018
    assert engine.model.dtype == torch.bfloat16 and engine.row_isolation is None
    assert engine.invariance().startswith("batched ≡ solo not guaranteed on cpu in bfloat16")


def test_cpu_flags_name_native_bfloat16(tmp_path):
    assert cpu.native_bfloat16_via({"avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile"}) == "AMX"
    assert cpu.native_bfloat16_via({"avx2", "avx512f", "avx512_bf16"}) == "AVX-512 BF16"
    assert cpu.native_bfloat16_via({"avx2", "avx512f", "avx512bw"}) is None  # AVX-512 alone: emulated bfloat16
    assert cpu.native_bfloat16_via(set(), {"amx": False, "avx512_bf16": True}) == "AVX-512 BF16"  # torch's word
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nmodel name\t: Some CPU\nflags\t\t: fpu avx2 amx_bf16\n\n"
                    "processor\t: 1\nmodel name\t: Some CPU\nflags\t\t: fpu avx2 amx_bf16\n")
    assert cpu._proc_cpuinfo(info) == ("Some CPU", {"fpu", "avx2", "amx_bf16"})
    assert cpu._proc_cpuinfo(tmp_path / "missing") == (None, set())
    line = cpu.describe_cpu(NOT_NATIVE)
    assert "AMD EPYC (test)" in line and "AVX2" in line and "native bfloat16: no" in line
    assert set(cpu.cpu_info()) == {"model", "capability", "native_bfloat16", "via", "flags"}
