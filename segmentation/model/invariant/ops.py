"""Batch-invariant implementations of the aten operators that reduce, with aten's own signatures.

Registered for one dispatch key by `segmentation.model.invariant.enable`, they replace PyTorch's
kernels for tensors of that device, so transformers' model code runs unchanged. Each keeps aten's
semantics (shapes, dtypes, broadcasting, alpha/beta) and computes through `kernels`; what the
kernels do not cover (float64, complex, transposed or grouped convolutions, dropout) goes to a
fallback that reaches PyTorch's own kernel without passing through these overrides again: the `out=`
overloads (separate operators whose kernels stay registered), `aten::_convolution`, or the math
attention. A thread-local depth turns a re-entrant call (an override reached from inside another)
into the fallback too, so no override can recurse into itself.

Inference only: no autograd formulas are registered for these kernels.
"""

from __future__ import annotations

import contextlib
import functools
import math
import threading

import torch

from . import kernels

_local = threading.local()


def _depth() -> int:
    return getattr(_local, "depth", 0)


def _guarded(fallback):
    """Run the decorated override, or `fallback` when called from inside another override."""

    def decorate(override):
        @functools.wraps(override)
        def run(*args, **kwargs):
            if _depth():
                return fallback(*args, **kwargs)
            _local.depth = _depth() + 1
            try:
                with _on_device(args[0]):
                    return override(*args, **kwargs)
            finally:
                _local.depth -= 1

        run.fallback = fallback
        return run

    return decorate


def _on_device(tensor: torch.Tensor):
    """Triton launches on the current CUDA device: make it the tensor's own."""
    if tensor.device.type == "cuda":
        return torch.cuda.device(tensor.device)
    return contextlib.nullcontext()


def _supported(*tensors: torch.Tensor | None) -> bool:
    """All given tensors share one dtype that the kernels take (None entries are skipped)."""
    present = [t for t in tensors if t is not None]
    return all(t.dtype == present[0].dtype for t in present) and present[0].dtype in kernels.SUPPORTED_DTYPES


def _empty(like: torch.Tensor) -> torch.Tensor:
    return like.new_empty(0)


# --- matrix products --------------------------------------------------------------------------


def _mm_fallback(self, mat2):
    return torch.ops.aten.mm.out(self, mat2, out=_empty(self))


@_guarded(_mm_fallback)
def mm(self: torch.Tensor, mat2: torch.Tensor) -> torch.Tensor:
    """aten::mm: [M, K] @ [K, N] -> [M, N]."""
    if not _supported(self, mat2) or self.dim() != 2 or mat2.dim() != 2:
        return _mm_fallback(self, mat2)
    return kernels.matmul(self, mat2)


def _addmm_fallback(self, mat1, mat2, *, beta=1, alpha=1):
    return torch.ops.aten.addmm.out(self, mat1, mat2, beta=beta, alpha=alpha, out=_empty(mat1))


@_guarded(_addmm_fallback)
def addmm(self: torch.Tensor, mat1: torch.Tensor, mat2: torch.Tensor, *, beta=1, alpha=1) -> torch.Tensor:
    """aten::addmm: beta * self + alpha * ([M, K] @ [K, N]); self broadcasts to [M, N] (a linear's bias)."""
    if not _supported(self, mat1, mat2) or mat1.dim() != 2 or mat2.dim() != 2 or isinstance(beta, complex):
        return _addmm_fallback(self, mat1, mat2, beta=beta, alpha=alpha)
    # beta = 0 ignores self entirely (NaNs included), as aten does.
    return kernels.matmul(mat1, mat2, self if beta != 0 else None, alpha=alpha, beta=beta)


def _bmm_fallback(self, mat2):
    return torch.ops.aten.bmm.out(self, mat2, out=_empty(self))


@_guarded(_bmm_fallback)
def bmm(self: torch.Tensor, mat2: torch.Tensor) -> torch.Tensor:
    """aten::bmm: [Z, M, K] @ [Z, K, N] -> [Z, M, N] (attention scores and weighted values)."""
    if not _supported(self, mat2) or self.dim() != 3 or mat2.dim() != 3:
        return _bmm_fallback(self, mat2)
    return kernels.matmul(self, mat2)


def _baddbmm_fallback(self, batch1, batch2, *, beta=1, alpha=1):
    return torch.ops.aten.baddbmm.out(self, batch1, batch2, beta=beta, alpha=alpha, out=_empty(batch1))


@_guarded(_baddbmm_fallback)
def baddbmm(self: torch.Tensor, batch1: torch.Tensor, batch2: torch.Tensor, *, beta=1, alpha=1) -> torch.Tensor:
    """aten::baddbmm: beta * self + alpha * ([Z, M, K] @ [Z, K, N]); self broadcasts to [Z, M, N]."""
    if not _supported(self, batch1, batch2) or batch1.dim() != 3 or batch2.dim() != 3 or isinstance(beta, complex):
        return _baddbmm_fallback(self, batch1, batch2, beta=beta, alpha=alpha)
    return kernels.matmul(batch1, batch2, self if beta != 0 else None, alpha=alpha, beta=beta)


# --- softmax ----------------------------------------------------------------------------------


def _softmax_fallback(self, dim, half_to_float):
    return torch.ops.aten._softmax.out(self, dim, half_to_float, out=_empty(self))


def _log_softmax_fallback(self, dim, half_to_float):
    return torch.ops.aten._log_softmax.out(self, dim, half_to_float, out=_empty(self))


def _softmax_dtype(self: torch.Tensor, half_to_float: bool) -> torch.dtype:
    return torch.float32 if half_to_float and self.dtype in (torch.float16, torch.bfloat16) else self.dtype


@_guarded(_softmax_fallback)
def softmax(self: torch.Tensor, dim: int, half_to_float: bool) -> torch.Tensor:
    """aten::_softmax: softmax over `dim` in float32; float32 out for 16-bit input when half_to_float."""
    if not _supported(self):
        return _softmax_fallback(self, dim, half_to_float)
    return kernels.softmax(self, dim, out_dtype=_softmax_dtype(self, half_to_float))


@_guarded(_log_softmax_fallback)
def log_softmax(self: torch.Tensor, dim: int, half_to_float: bool) -> torch.Tensor:
    """aten::_log_softmax: as `softmax`, the logarithm (the grammar's token log-probabilities)."""
    if not _supported(self):
        return _log_softmax_fallback(self, dim, half_to_float)
    return kernels.softmax(self, dim, log=True, out_dtype=_softmax_dtype(self, half_to_float))


# --- mean and sum over dimensions ---------------------------------------------------------------


def _reduced_dims(self: torch.Tensor, dim) -> list[int]:
    if dim is None or len(dim) == 0:  # aten: no dims means all of them
        return list(range(self.dim()))
    return sorted({d % max(self.dim(), 1) for d in dim})


def _reduce(self: torch.Tensor, dim, keepdim: bool, dtype, *, mean: bool) -> torch.Tensor:
    """Sum or mean over `dim`: reduced dims moved last and flattened into rows, one row per output."""
    source = self if dtype is None else self.to(dtype)
    dims = _reduced_dims(source, dim)
    kept = [d for d in range(source.dim()) if d not in dims]
    n = math.prod(source.shape[d] for d in dims)
    rows = source.permute(*kept, *dims).reshape(-1, n)
    if not rows.is_contiguous():
        rows = rows.contiguous()
    out = (kernels.row_mean if mean else kernels.row_sum)(rows, source.dtype)
    shape = [1 if d in dims else source.shape[d] for d in range(source.dim())] if keepdim else \
        [source.shape[d] for d in kept]
    return out.reshape(shape)


def _mean_fallback(self, dim, keepdim=False, *, dtype=None):
    return torch.ops.aten.mean.out(self, dim, keepdim, dtype=dtype, out=_empty(self if dtype is None else
                                                                                self.new_empty(0, dtype=dtype)))


@_guarded(_mean_fallback)
def mean_dim(self: torch.Tensor, dim, keepdim: bool = False, *, dtype=None) -> torch.Tensor:
    """aten::mean.dim: the mean over `dim` (Gemma 2's RMSNorm: x.pow(2).mean(-1, keepdim=True))."""
    if not _supported(self) or (dtype is not None and dtype not in kernels.SUPPORTED_DTYPES):
        return _mean_fallback(self, dim, keepdim, dtype=dtype)
    return _reduce(self, dim, keepdim, dtype, mean=True)


def _sum_fallback(self, dim, keepdim=False, *, dtype=None):
    out = self.new_empty(0, dtype=dtype or (torch.int64 if not self.is_floating_point() and
                                            not self.is_complex() else self.dtype))
    return torch.ops.aten.sum.IntList_out(self, dim, keepdim, dtype=dtype, out=out)


@_guarded(_sum_fallback)
def sum_dim(self: torch.Tensor, dim, keepdim: bool = False, *, dtype=None) -> torch.Tensor:
    """aten::sum.dim_IntList for floating tensors (integer sums are exact in any order: left to aten)."""
    if not _supported(self) or (dtype is not None and dtype not in kernels.SUPPORTED_DTYPES):
        return _sum_fallback(self, dim, keepdim, dtype=dtype)
    return _reduce(self, dim, keepdim, dtype, mean=False)


# --- layer norm -------------------------------------------------------------------------------


def _layer_norm_reference(input, normalized_shape, weight, bias, eps):
    """native_layer_norm for what the kernel does not take (float64), from aten's reductions."""
    dims = list(range(input.dim() - len(normalized_shape), input.dim()))
    mean = torch.ops.aten.mean.out(input, dims, True, out=_empty(input))
    centred = input - mean
    var = torch.ops.aten.mean.out(centred * centred, dims, True, out=_empty(input))
    rstd = torch.rsqrt(var + eps)
    out = centred * rstd
    if weight is not None:
        out = out * weight
    if bias is not None:
        out = out + bias
    return out, mean, rstd


@_guarded(_layer_norm_reference)
def native_layer_norm(input, normalized_shape, weight, bias, eps):
    """aten::native_layer_norm: (out, mean, rstd) over the last len(normalized_shape) dims, one row each.

    out has input's shape and dtype; mean and rstd are input.shape[:axis] + (1,) * len(normalized_shape),
    float32 (as PyTorch's CUDA kernel keeps them for 16-bit input).
    """
    if not _supported(input, weight, bias):
        return _layer_norm_reference(input, normalized_shape, weight, bias, eps)
    axis = input.dim() - len(normalized_shape)
    n = math.prod(normalized_shape)
    rows = input.contiguous().reshape(-1, n)
    flat_weight = weight.contiguous().reshape(n) if weight is not None else None
    flat_bias = bias.contiguous().reshape(n) if bias is not None else None
    out, mean, rstd = kernels.layer_norm(rows, flat_weight, flat_bias, eps)
    stats_shape = list(input.shape[:axis]) + [1] * len(normalized_shape)
    return out.reshape(input.shape), mean.reshape(stats_shape), rstd.reshape(stats_shape)


# --- convolution (SigLIP's patch embedding) ------------------------------------------------------


def _convolution_fallback(input, weight, bias, stride, padding, dilation, transposed, output_padding, groups):
    cudnn = torch.backends.cudnn
    return torch.ops.aten._convolution(
        input, weight, bias, stride, padding, dilation, transposed, output_padding, groups,
        cudnn.benchmark, cudnn.deterministic or torch.are_deterministic_algorithms_enabled(), cudnn.enabled,
        cudnn.allow_tf32,
    )


@_guarded(_convolution_fallback)
def convolution(input, weight, bias, stride, padding, dilation, transposed, output_padding, groups):
    """aten::convolution, 2-D, not transposed, groups = 1: im2col (a copy, no arithmetic), then `matmul`.

    input [B, C, H, W], weight [O, C, kh, kw], bias [O] or None -> [B, O, oh, ow] contiguous. A
    convolution library picks its algorithm by the batch size; as a matmul over (C, kh, kw) with the
    image positions as rows, each output pixel is summed in one fixed order.
    """
    if transposed or groups != 1 or input.dim() != 4 or weight.dim() != 4 or not _supported(input, weight, bias):
        return _convolution_fallback(input, weight, bias, stride, padding, dilation, transposed, output_padding,
                                     groups)
    # aten passes one value for both sides when they are equal (e.g. padding="valid" gives [0]).
    stride, padding, dilation = (tuple(v) * 2 if len(v) == 1 else tuple(v) for v in (stride, padding, dilation))
    batch, _, height, width = input.shape
    out_channels, _, kh, kw = weight.shape
    cols = torch.nn.functional.unfold(input, (kh, kw), dilation=dilation, padding=padding, stride=stride)
    oh = (height + 2 * padding[0] - dilation[0] * (kh - 1) - 1) // stride[0] + 1
    ow = (width + 2 * padding[1] - dilation[1] * (kw - 1) - 1) // stride[1] + 1
    rows = cols.transpose(1, 2).reshape(batch * oh * ow, -1)  # [B * L, C * kh * kw]
    out = kernels.matmul(rows, weight.reshape(out_channels, -1).t(), bias)
    return out.reshape(batch, oh * ow, out_channels).transpose(1, 2).reshape(batch, out_channels, oh, ow)


# --- attention (SigLIP runs sdpa; Gemma 2 runs eager attention, i.e. bmm and softmax above) -------


def _attention_fallback(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, *, scale=None,
                        enable_gqa=False):
    if attn_mask is not None and attn_mask.dtype == torch.bool:
        # The math kernel adds its mask: a boolean one (True = attend) must become 0 / -inf first.
        attn_mask = torch.zeros(attn_mask.shape, dtype=query.dtype, device=query.device).masked_fill_(
            ~attn_mask, float("-inf"))
    return torch.ops.aten._scaled_dot_product_attention_math(
        query, key, value, attn_mask, dropout_p, is_causal, scale=scale, enable_gqa=enable_gqa)[0]


@_guarded(_attention_fallback)
def scaled_dot_product_attention(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, *,
                                 scale=None, enable_gqa=False):
    """aten::scaled_dot_product_attention as math with one fixed split: scores, softmax, weighted sum.

    query [..., L, E], key [..., S, E], value [..., S, Ev] (leading dims broadcast; with enable_gqa,
    key/value heads (dim -3) are repeated to the query's); attn_mask bool (True = attend) or additive,
    broadcastable to [..., L, S]. Returns [..., L, Ev] in query's dtype. The fused kernels (flash,
    memory-efficient, cuDNN) split the keys by a heuristic of the batch's size; this never splits
    them: each score row is one matmul row and one softmax row. Scores are rounded to the input dtype
    before a float32 softmax, as eager attention does. A row with every key masked gives zeros.
    """
    if dropout_p > 0.0 or not _supported(query, key, value) or query.dim() < 3:
        return _attention_fallback(query, key, value, attn_mask, dropout_p, is_causal, scale=scale,
                                   enable_gqa=enable_gqa)
    if enable_gqa and key.shape[-3] != query.shape[-3]:
        repeat = query.shape[-3] // key.shape[-3]
        key, value = key.repeat_interleave(repeat, -3), value.repeat_interleave(repeat, -3)
    length, dim = query.shape[-2:]
    keys = key.shape[-2]
    lead = torch.broadcast_shapes(query.shape[:-2], key.shape[:-2], value.shape[:-2])
    q = query.expand(*lead, length, dim).reshape(-1, length, dim)
    k = key.expand(*lead, keys, dim).reshape(-1, keys, dim)
    v = value.expand(*lead, keys, value.shape[-1]).reshape(-1, keys, value.shape[-1])
    scale = dim**-0.5 if scale is None else scale
    scores = kernels.matmul(q, k.transpose(1, 2), alpha=scale).view(*lead, length, keys)
    if is_causal:
        causal = torch.ones(length, keys, dtype=torch.bool, device=query.device).tril()
        scores = scores.masked_fill(~causal, float("-inf"))
    if attn_mask is not None:
        if attn_mask.dtype == torch.bool:
            scores = scores.masked_fill(~attn_mask, float("-inf"))
        else:
            scores = scores + attn_mask
    probs = kernels.softmax(scores, -1, out_dtype=torch.float32)
    if attn_mask is not None or is_causal:
        # Every key masked: aten's math attention answers zeros there, not NaN.
        probs = probs.masked_fill(torch.isneginf(scores).all(-1, keepdim=True), 0.0)
    out = kernels.matmul(probs.to(query.dtype).reshape(-1, length, keys), v)
    return out.view(*lead, length, value.shape[-1])


# The aten operators (name, overload) replaced for a dispatch key, and their implementations.
OVERRIDES: dict[str, object] = {
    "mm": mm,
    "addmm": addmm,
    "bmm": bmm,
    "baddbmm": baddbmm,
    "_softmax": softmax,
    "_log_softmax": log_softmax,
    "mean.dim": mean_dim,
    "sum.dim_IntList": sum_dim,
    "native_layer_norm": native_layer_norm,
    "convolution": convolution,
    "scaled_dot_product_attention": scaled_dot_product_attention,
}
