"""What only a CUDA GPU can show (`pytest -m cuda`; skipped without a visible GPU, under 3 minutes on an H200).

The rest of the suite runs on the CPU in float32 (tests/conftest.py hides GPUs unless SEG_TEST_DEVICE=cuda
or `-m cuda`), where no graph is captured and no kernel is batch-dependent in the ways a GPU's are. Here:
CUDA graphs captured for every bucket and replayed against the same fixed-shape step run eagerly; the
eager step free of host synchronisation under CUDA's own sync detector; buffers reserved once; graphs
never replayed under another batch-invariant mode; the invariant kernels registered at the CUDA key; a
failed capture leaving the engine correct. Expectations depend on the dtype where arithmetic does.
"""

from __future__ import annotations

import contextlib
import copy

import pytest
import torch
from gpu_check import replay_and_eager  # scripts/gpu_check.py: the same comparison, in its tiny phase
from pictures import random_image
from test_graph_step import HostSyncGuard

from segmentation.model import invariant
from segmentation.model.engine import PaliGemmaEngine
from segmentation.model.graph.decoder import GraphSettings
from segmentation.model.prompts import parse_prompt

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(),
                       reason="no CUDA GPU visible (the suite hides GPUs unless SEG_TEST_DEVICE=cuda or -m cuda)"),
]

BUCKETS = (1, 2, 4)


@pytest.fixture(scope="module")
def parts():
    """The tiny model on the GPU in float32 and its processor (built in memory: no files, no VAE)."""
    from make_tiny_model import SIZES, build_paligemma, build_processor, build_tokenizer

    tokenizer = build_tokenizer()
    model = build_paligemma(tokenizer, size="tiny", seed=0, device="cuda").float().eval()
    return model, build_processor(tokenizer, SIZES["tiny"]["image_size"])


# Function scope: a module-scoped parametrized fixture would make pytest reorder the tests, and the
# capture-failure test must stay last.
@pytest.fixture(params=[torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
def engine(request, parts):
    model, processor = parts
    model = model if request.param == torch.float32 else copy.deepcopy(model).to(request.param)
    return PaliGemmaEngine(model, processor, generation="graph", max_new_tokens=64,
                           graph=GraphSettings(buckets=BUCKETS, sync_every=3))


def batch(rows: int, seed: int = 0):
    texts = ("cat ; dog", "car ; bus ; truck", "bird", "the man on the left")
    images = [random_image(60 + 9 * i, 80 - 4 * i, seed + i) for i in range(rows)]
    prompts = [parse_prompt(texts[i % 4], "detect" if i % 2 else "segment") for i in range(rows)]
    return images, prompts, [10 + 13 * i for i in range(rows)]


def test_every_bucket_is_captured_and_replays_the_eager_step(engine):
    decoder = engine.decoder
    assert sorted(decoder.graphs) == list(BUCKETS) and decoder.capture_failures == {}
    assert set(decoder.capture_report) == set(BUCKETS)
    assert engine.graph_status()["captured"] and engine.graph_status()["eager_buckets"] == []
    start = dict(decoder.steps)
    for rows in (1, 2, 3, 4):  # buckets 1, 2, 4 (one idle row), 4
        replayed, eager, replay_steps, eager_steps = replay_and_eager(engine, *batch(rows, seed=rows))
        assert set(replay_steps) <= {"graph"} and set(eager_steps) <= {"fixed"}  # each on its own path
        assert replay_steps.get("graph", 0) == eager_steps.get("fixed", 0)  # as many steps each way
        # The same kernels on the same shapes, once recorded and replayed: the same bits in any dtype.
        assert [g.token_ids for g in replayed] == [g.token_ids for g in eager], rows
        assert [g.token_logprobs for g in replayed] == [g.token_logprobs for g in eager], rows
    assert decoder.steps["graph"] - start["graph"] > 10  # (a random row may end at its first token)


def test_replayed_rows_agree_with_the_fast_loop_as_the_dtype_allows(engine):
    images, prompts, budgets = batch(3, seed=11)
    fast = PaliGemmaEngine(engine.model, engine.processor, generation="fast")
    graph_rows = engine.generate(images, prompts, max_new_tokens=budgets)
    fast_rows = fast.generate(images, prompts, max_new_tokens=budgets)
    if engine.model.dtype == torch.float32:  # other kernels, other shapes: equal tokens, close scores
        assert [g.token_ids for g in graph_rows] == [g.token_ids for g in fast_rows]
        for g, f in zip(graph_rows, fast_rows):
            assert max((abs(a - b) for a, b in zip(g.token_logprobs, f.token_logprobs)), default=0.0) < 1e-3
    else:  # bfloat16 rounds differently along the two paths: the prefill's token agrees, later ones may part
        assert all(g.token_ids[:1] == f.token_ids[:1] for g, f in zip(graph_rows, fast_rows))


@contextlib.contextmanager
def sync_detector():
    """CUDA's own detection of synchronising calls: any raises while inside."""
    torch.cuda.set_sync_debug_mode("error")
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode("default")


def test_the_eager_step_never_synchronises_on_cuda(engine):
    decoder = engine.decoder
    images, prompts, _ = batch(2, seed=5)
    specs = [engine.row_spec(p, 40) for p in prompts]
    decoder.reset()
    decoder.prefill([0, 1], engine.prepare(images, prompts), specs)
    torch.cuda.synchronize()
    fixed = decoder.steps["fixed"]
    with decoder.without_graphs(), HostSyncGuard() as guard, sync_detector():
        for _ in range(6):
            decoder.run_step(2)
    torch.cuda.synchronize()
    assert guard.calls == []
    assert decoder.steps["fixed"] == fixed + 6
    assert int(decoder.state.generated[0]) == 7  # they did run: the prefill's token + 6
    decoder.reset()


def test_buffers_are_reserved_once_and_replays_allocate_nothing(engine):
    decoder = engine.decoder
    text = engine.model.config.text_config
    size = {torch.float32: 4, torch.bfloat16: 2}[decoder.dtype]  # bytes per cached key element
    cache = 2 * text.num_hidden_layers * decoder.slots * text.num_key_value_heads * decoder.length * text.head_dim
    assert decoder.reserved_bytes() == cache * size + decoder.slots * decoder.length * (8 + 4)
    pointers = [decoder.keys[0].data_ptr(), decoder.values[-1].data_ptr(), decoder.out_tokens.data_ptr()]
    images, prompts, budgets = batch(3, seed=21)
    engine.generate(images, prompts, max_new_tokens=budgets)
    torch.cuda.synchronize()
    allocated = torch.cuda.memory_allocated()
    for _ in range(2):
        engine.generate(images, prompts, max_new_tokens=budgets)
    torch.cuda.synchronize()
    assert torch.cuda.memory_allocated() - allocated <= 2**20  # steady state: nothing kept per generation
    assert [decoder.keys[0].data_ptr(), decoder.values[-1].data_ptr(), decoder.out_tokens.data_ptr()] == pointers


needs_kernels = pytest.mark.skipif(not invariant.available("cuda"),
                                   reason="batch-invariant kernels unavailable (Triton, sm80+, TRITON_INTERPRET=0)")


@needs_kernels
def test_invariant_kernels_are_registered_at_the_cuda_key(monkeypatch):
    from segmentation.model.invariant import kernels

    calls = []
    original = kernels.matmul
    monkeypatch.setattr(kernels, "matmul", lambda *a, **k: calls.append(a[0].device.type) or original(*a, **k))
    a = torch.randn(16, 128, device="cuda")
    with invariant.batch_invariant("cuda"):
        torch.mm(a, a.T)
        torch.nn.functional.linear(a, a)
        torch.mm(a.cpu(), a.cpu().T)  # the CPU key keeps PyTorch's kernel
    torch.mm(a, a.T)  # and after disable, CUDA's too
    assert calls == ["cuda", "cuda"]


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
def test_invariant_rows_are_the_same_bits_in_any_batch(dtype):
    generator = torch.Generator(device="cuda").manual_seed(0)
    w = torch.randn(1024, 2304, device="cuda", generator=generator, dtype=dtype)
    x = torch.randn(16, 2304, device="cuda", generator=generator, dtype=dtype)
    with invariant.batch_invariant("cuda"):
        batched = torch.nn.functional.linear(x, w)
        alone = torch.cat([torch.nn.functional.linear(x[i:i + 1], w) for i in range(16)])
        soft = torch.log_softmax(batched.float(), -1)
        soft_alone = torch.cat([torch.log_softmax(batched[i:i + 1].float(), -1) for i in range(16)])
    assert torch.equal(batched, alone) and torch.equal(soft, soft_alone)


@needs_kernels
def test_graphs_captured_under_one_mode_are_never_replayed_under_the_other(parts):
    model, processor = parts
    engine = PaliGemmaEngine(model, processor, generation="graph", max_new_tokens=32,
                             graph=GraphSettings(buckets=(1, 2)))
    decoder = engine.decoder
    assert decoder.graph_mode == frozenset() and sorted(decoder.graphs) == [1, 2]
    images, prompts, budgets = batch(2, seed=31)
    try:
        invariant.enable("cuda")
        specs = [engine.row_spec(p, b) for p, b in zip(prompts, budgets)]
        decoder.reset()
        decoder.prefill([0, 1], engine.prepare(images, prompts), specs)
        before = dict(decoder.steps)
        decoder.run_step(2)  # the graph holds cuBLAS kernels: stepped eagerly instead
        assert decoder.steps["fixed"] == before["fixed"] + 1 and decoder.steps["graph"] == before["graph"]
        assert engine.decoder is decoder and decoder.graph_mode == frozenset({"cuda"})  # captured anew
        assert sorted(decoder.graphs) == [1, 2]
        decoder.prefill([0, 1], engine.prepare(images, prompts), specs)  # (the capture reset the slots)
        before = dict(decoder.steps)
        decoder.run_step(2)  # the new graph, under the mode it holds
        assert decoder.steps["graph"] == before["graph"] + 1 and decoder.steps["fixed"] == before["fixed"]
        on = engine.generate(images, prompts, max_new_tokens=budgets)
        with decoder.without_graphs():
            eager_on = engine.generate(images, prompts, max_new_tokens=budgets)
        assert [g.token_ids for g in on] == [g.token_ids for g in eager_on]
    finally:
        invariant.disable("cuda")


def test_a_failed_capture_leaves_that_bucket_eager_and_the_answers_unchanged(parts, caplog):
    """A step that synchronises cannot be captured (CUDA refuses): that bucket's capture fails, is logged
    once with its reason, and the bucket steps eagerly with the same answers. Last in the file: a failed
    capture is the one thing here that could leave the CUDA context in a bad state."""
    model, processor = parts
    reference = PaliGemmaEngine(model, processor, generation="graph", max_new_tokens=48,
                                graph=GraphSettings(buckets=(1, 2)))
    engine = PaliGemmaEngine(model, processor, generation="graph", max_new_tokens=48,
                             graph=GraphSettings(buckets=(1, 2)))
    images, prompts, budgets = batch(2, seed=41)
    want = reference.generate(images, prompts, max_new_tokens=budgets)
    engine._decoder = None
    from segmentation.model.graph import decoder as decoder_module

    step = decoder_module.StaticDecoder._step

    def step_that_syncs_at_bucket_2(self, batch):
        if batch == 2 and torch.cuda.is_current_stream_capturing():
            self.finished[:batch].any().item()  # a host sync: illegal inside a capture
        return step(self, batch)

    with pytest.MonkeyPatch.context() as patch, caplog.at_level("ERROR"):
        patch.setattr(decoder_module.StaticDecoder, "_step", step_that_syncs_at_bucket_2)
        decoder = engine.decoder
    assert sorted(decoder.graphs) == [1] and list(decoder.capture_failures) == [2]
    assert [r for r in caplog.records if "capture failed for bucket 2" in r.getMessage()]
    status = engine.graph_status()
    assert status["buckets"] == [1] and status["eager_buckets"] == [2] and "2" in status["failures"]
    got = engine.generate(images, prompts, max_new_tokens=budgets)
    specs = [engine.row_spec(p, b) for p, b in zip(prompts, budgets)]
    decoder.prefill([0, 1], engine.prepare(images, prompts), specs)
    before = dict(decoder.steps)
    decoder.run_step(2)  # no graph: the eager step
    decoder.run_step(1)  # its graph
    assert decoder.steps["fixed"] == before["fixed"] + 1 and decoder.steps["graph"] == before["graph"] + 1
    decoder.reset()
    assert [g.token_ids for g in got] == [g.token_ids for g in want]
    assert [g.token_logprobs for g in got] == [g.token_logprobs for g in want]
