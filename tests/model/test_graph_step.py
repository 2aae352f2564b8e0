"""The graph engine's decode step (segmentation/model/graph/decoder.py) as a fixed-shape, host-free step:
no host synchronisation and no data-dependent shape inside it, and one compiled graph per bucket."""

import pytest
import torch
from pictures import random_image
from torch.overrides import TorchFunctionMode

from segmentation.model.engine import PaliGemmaEngine
from segmentation.model.graph.decoder import GraphSettings, StaticDecoder, bucket_for
from segmentation.model.prompts import parse_prompt

# Tensor methods that copy to the host or wait for the device, and operations whose output shape
# depends on the data: none may run inside a step that a CUDA graph replays.
HOST_SYNC = {
    torch.Tensor.item, torch.Tensor.tolist, torch.Tensor.cpu, torch.Tensor.numpy, torch.Tensor.__bool__,
    torch.Tensor.__int__, torch.Tensor.__float__, torch.Tensor.__index__,
}
DATA_DEPENDENT_SHAPE = {
    torch.nonzero, torch.Tensor.nonzero, torch.masked_select, torch.Tensor.masked_select, torch.unique,
    torch.Tensor.unique, torch.argwhere, torch.where_nonzero if hasattr(torch, "where_nonzero") else torch.nonzero,
    torch.repeat_interleave, torch.Tensor.repeat_interleave,
}


class HostSyncGuard(TorchFunctionMode):
    """Records every host synchronisation or data-dependent shape a block of tensor code performs."""

    def __init__(self):
        super().__init__()
        self.calls: list[str] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", repr(func))
        if func in HOST_SYNC or func in DATA_DEPENDENT_SHAPE:
            self.calls.append(name)
        elif func is torch.Tensor.to and args[0].device.type != "cpu" and any(
                str(a) == "cpu" for a in (*args[1:], kwargs.get("device"))):
            self.calls.append("to(cpu)")  # a copy to the host (on the CPU, `.to(cpu)` is no copy)
        elif func is torch.Tensor.__getitem__ and _has_bool_index(args[1]):
            self.calls.append("boolean-mask indexing")
        return func(*args, **kwargs)


def _has_bool_index(index) -> bool:
    parts = index if isinstance(index, tuple) else (index,)
    return any(isinstance(p, torch.Tensor) and p.dtype == torch.bool for p in parts)



@pytest.fixture(scope="module")
def engine(tiny_fixtures):
    return PaliGemmaEngine.from_pretrained(tiny_fixtures / "paligemma", generation="graph",
                                           graph=GraphSettings(buckets=(1, 2, 4)))


def test_the_guard_catches_what_it_looks_for():
    """The guard itself: each kind of forbidden call is seen (so a clean step means something)."""
    x = torch.arange(6)
    with HostSyncGuard() as guard:
        x.sum().item()
        x.tolist()
        bool(x.any())
        x.nonzero()
        x[x > 2]
        x.cpu()
    assert guard.calls == ["item", "tolist", "__bool__", "nonzero", "boolean-mask indexing", "cpu"]


@pytest.mark.parametrize("labels_from_prompt", [False, True])
def test_a_step_never_synchronises_with_the_host(engine, labels_from_prompt):
    decoder = engine.decoder
    prompts = [parse_prompt("cat ; dog"), parse_prompt("car", "detect")]
    prompts = [p.__class__(**{**vars(p), "labels_from_prompt": labels_from_prompt}) for p in prompts]
    images = [random_image(90, 60, 1), random_image(60, 90, 2)]
    specs = [engine.row_spec(p) for p in prompts]
    inputs = _inputs(engine, images, prompts)
    decoder.reset()
    decoder.prefill([0, 1], inputs, specs)
    with HostSyncGuard() as guard:
        for _ in range(12):
            decoder.run_step(2)
    assert guard.calls == []
    assert int(decoder.state.generated[0]) == 13  # the steps did run: prefill's token + 12


def test_every_bucket_steps_on_a_device_without_data(tiny_fixtures):
    """On the meta device tensors have shapes and no values: any host copy (`.item()`, `.cpu()`,
    `.to("cpu")`, `bool()`) or data-dependent shape (`nonzero`, boolean indexing) raises there. The
    whole step, forward and grammar, runs on it for every bucket."""
    from transformers import PaliGemmaConfig, PaliGemmaForConditionalGeneration

    from segmentation.model.grammar import RowSpec
    from segmentation.model.graph.device_grammar import compile_rows, copy_rows

    engine = PaliGemmaEngine.from_pretrained(tiny_fixtures / "paligemma")
    with torch.device("meta"):
        model = PaliGemmaForConditionalGeneration(PaliGemmaConfig.from_pretrained(tiny_fixtures / "paligemma"))
    decoder = StaticDecoder(model, engine.vocab, pad_id=0, length=300, buckets=(1, 3, 8))
    assert decoder.keys[0].device.type == "meta"
    specs = [RowSpec("segment", 40, allowed_labels=((5, 6), (5, 7, 8))), RowSpec("detect", 20)] * 4
    with torch.inference_mode():  # the decoder's buffers are inference tensors
        copy_rows(decoder.rows, compile_rows(specs, device="meta"))
    with pytest.raises((RuntimeError, NotImplementedError)):
        decoder.finished.all().item()  # what the host does between steps is not possible here
    for batch in decoder.buckets:
        decoder.run_step(batch)
    assert decoder.out_tokens.shape == (8, 300)


def _inputs(engine, images, prompts):
    from segmentation.model.images import model_input

    pictures = [model_input(image, engine.image_size) for image in images]
    inputs = engine.processor(images=pictures, text=["<image>" + p.text for p in prompts], return_tensors="pt",
                              padding="longest")
    inputs.pop("labels", None)
    return inputs


def test_buckets_are_the_smallest_that_hold_the_rows():
    assert [bucket_for(n, (1, 2, 4, 8)) for n in (1, 2, 3, 5, 8)] == [1, 2, 4, 8, 8]
    with pytest.raises(ValueError, match="largest bucket"):
        bucket_for(9, (1, 2, 4, 8))


def test_a_compiled_step_compiles_once_per_bucket(tiny_fixtures):
    """Under torch.compile every bucket's step is one graph, traced once, never again over a generation."""
    from torch._dynamo.testing import CompileCounter

    engine = PaliGemmaEngine.from_pretrained(tiny_fixtures / "paligemma", generation="graph",
                                             graph=GraphSettings(buckets=(1, 2)))
    counter = CompileCounter()
    decoder = engine.decoder
    decoder._step_fn = torch.compile(decoder._step, backend=counter, fullgraph=True, dynamic=False)
    decoder.fixed_span = True  # as GraphSettings(compile=True) sets it: attend over the whole cache
    torch._dynamo.reset()
    images = [random_image(80, 80, s) for s in range(3)]
    prompts = [parse_prompt("cat ; dog"), parse_prompt("bird", "detect"), parse_prompt("car ; bus")]
    eager = PaliGemmaEngine.from_pretrained(tiny_fixtures / "paligemma", generation="graph",
                                            graph=GraphSettings(buckets=(1, 2)))
    first = engine.generate(images[:2], prompts[:2])  # bucket 2
    assert counter.frame_count == 1
    second = engine.generate(images[2:], prompts[2:])  # bucket 1: one more graph
    third = engine.generate(images[:2][::-1], prompts[:2][::-1])  # bucket 2 again: none
    assert counter.frame_count == 2
    assert max(len(g.token_ids) for g in first + second + third) > 20  # many steps ran through each graph
    want = eager.generate(images[:2], prompts[:2]) + eager.generate(images[2:], prompts[2:])
    assert [g.token_ids for g in first + second] == [w.token_ids for w in want]


def test_buffers_are_reserved_once_for_the_largest_bucket(engine):
    decoder: StaticDecoder = engine.decoder
    text = engine.model.config.text_config
    per_layer = decoder.slots * text.num_key_value_heads * decoder.length * text.head_dim * 4  # float32
    assert decoder.reserved_bytes() >= 2 * text.num_hidden_layers * per_layer
    keys = decoder.keys[0].data_ptr()
    engine.generate([random_image(50, 50, 3)], [parse_prompt("cat")])
    assert decoder.keys[0].data_ptr() == keys


def test_batch_invariant_graph_engine_isolates_rows_on_the_cpu(tiny_fixtures):
    """With SEG_BATCH_INVARIANT on the CPU the graph engine gives a row the same shapes in any batch: each
    prompt prefilled alone at its own length (no padding to one length: that is the GPU's way) and, unless
    this CPU's kernels compute a row the same at any batch size, every step computing all slots over the
    whole cache; its answers stay those of the fast loop."""
    engine = PaliGemmaEngine.from_pretrained(tiny_fixtures / "paligemma", generation="graph", batch_invariant=True,
                                             graph=GraphSettings(buckets=(1, 2, 4)))
    fast = PaliGemmaEngine.from_pretrained(tiny_fixtures / "paligemma", generation="fast")
    images = [random_image(70, 50, s) for s in range(3)]
    prompts = [parse_prompt("cat"), parse_prompt("car ; bus ; the man on the left", "detect"), parse_prompt("dog")]
    lengths = {engine.prepare([image], [prompt])["input_ids"].shape[1] for image, prompt in zip(images, prompts)}
    assert len(lengths) == 2  # each prompt keeps its own length
    decoder = engine.decoder
    assert engine.row_isolation in ("any batch", "fixed batch") and decoder.per_row_prefill
    if engine.row_isolation == "fixed batch":
        assert decoder.batch_for(1) == decoder.slots and decoder.fixed_span and decoder.span == decoder.length
    got = engine.generate(images, prompts)
    want = fast.generate(images, prompts)
    assert [g.token_ids for g in got] == [w.token_ids for w in want]
    assert engine.invariance().startswith("batched ≡ solo bit for bit on cpu in float32")
