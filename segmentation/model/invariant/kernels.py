"""Batch-invariant Triton kernels: each output row is computed the same way whatever the row count.

A GPU library kernel (cuBLAS, cuDNN, PyTorch's reductions) picks its tiles, split-K factor and
reduction tree from the whole problem's shape, so row i of a batch of 32 can round differently from
the same row alone. These kernels fix every choice that decides rounding from what does not change
with the batch:

- `matmul`: tiles (BLOCK_M, BLOCK_N, BLOCK_K) depend only on the dtype; no split-K; each output
  element accumulates its K products in float32, BLOCK_K at a time, from k = 0 upwards; the bias is
  added once, after the whole sum. Batched (`[Z, M, K] @ [Z, K, N]`) runs one grid layer per matrix.
- `softmax` / `log_softmax` / `row_mean` / `row_sum` / `layer_norm`: a row is read in chunks of
  BLOCK columns, partial sums are kept per lane across chunks and folded by one fixed tree at the
  end; a program holds ROWS rows side by side, each reduced on its own. BLOCK and ROWS come from the
  row length only (`row_tile`).

So a row's bits depend on its own values and on the shapes that do not vary with the batch (K, N,
row length), never on M, Z or the other rows. Padding a row to a different length (a longer prompt
in the batch) does change which lane each value lands in: batched ≡ solo needs the same padded
shapes in both, which a fixed-shape engine gives.

Inputs: float16, bfloat16, float32 (float64 is left to PyTorch by the callers). Reductions run in
float32. Under `TRITON_INTERPRET=1` these kernels run on CPU tensors (bfloat16 then reads wrongly:
test in float32/float16 on the CPU).

Importing this module imports Triton; `segmentation.model.invariant` imports it only when needed.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

# Tile sizes per input dtype: never a function of M (the rows), so a row meets the same tiles alone
# and in any batch. Unmeasured on a GPU this round: tuned guesses (64-row tiles waste work at small
# decode batches, but a decode step is bound by reading the weights, not by arithmetic).
MATMUL_TILES: dict[torch.dtype, tuple[int, int, int]] = {
    torch.float16: (64, 128, 64),
    torch.bfloat16: (64, 128, 64),
    torch.float32: (64, 64, 32),
}
MATMUL_WARPS = 4
MATMUL_STAGES = 3
# Row kernels read at most MAX_ROW_BLOCK columns of a row at a time, and take up to this many
# elements (rows x columns) per program: short rows share a program, each in its own lanes.
MAX_ROW_BLOCK = 4096
ROW_TILE_ELEMENTS = 4096
MAX_ROWS_PER_PROGRAM = 64
SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def row_tile(n: int) -> tuple[int, int]:
    """(rows per program, chunk width) of a row kernel for rows of `n` columns: a function of `n` only.

    Several rows in one program do not mix: each row is reduced along its own axis of the
    [rows, chunk] block by the same tree, whichever lane of the block it lands in.
    """
    block = min(triton.next_power_of_2(max(n, 1)), MAX_ROW_BLOCK)
    return max(1, min(MAX_ROWS_PER_PROGRAM, ROW_TILE_ELEMENTS // block)), block


def float32_precision() -> str:
    """`tl.dot`'s precision for float32 inputs: TF32 only where PyTorch itself allows it for matmuls."""
    return "tf32" if torch.backends.cuda.matmul.allow_tf32 else "ieee"


@triton.jit
def _matmul_kernel(
    a_ptr, b_ptr, c_ptr, bias_ptr,
    M, N, K,
    stride_az, stride_am, stride_ak,
    stride_bz, stride_bk, stride_bn,
    stride_cz, stride_cm, stride_cn,
    stride_biasz, stride_biasm, stride_biasn,
    alpha, beta,
    HAS_BIAS: tl.constexpr, SCALED: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    PRECISION: tl.constexpr,
):
    # 64-bit offsets: Z * stride can pass 2**31 elements for large attention batches.
    pid_m = tl.program_id(0).to(tl.int64)
    pid_n = tl.program_id(1).to(tl.int64)
    z = tl.program_id(2).to(tl.int64)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    a_ptrs = a_ptr + z * stride_az + rm[:, None] * stride_am + rk[None, :] * stride_ak
    b_ptrs = b_ptr + z * stride_bz + rk[:, None] * stride_bk + rn[None, :] * stride_bn
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    # One pass over K in a fixed order: no split-K, so no cross-program reduction whose shape could
    # depend on how many tiles the grid has.
    for k in range(0, tl.cdiv(K, BLOCK_K)):
        left = K - k * BLOCK_K
        a = tl.load(a_ptrs, mask=(rm[:, None] < M) & (rk[None, :] < left), other=0.0)
        b = tl.load(b_ptrs, mask=(rk[:, None] < left) & (rn[None, :] < N), other=0.0)
        acc = tl.dot(a, b, acc, input_precision=PRECISION)
        a_ptrs += BLOCK_K * stride_ak
        b_ptrs += BLOCK_K * stride_bk
    if SCALED:
        acc = acc * alpha
    inside = (rm[:, None] < M) & (rn[None, :] < N)
    if HAS_BIAS:
        bias_ptrs = bias_ptr + z * stride_biasz + rm[:, None] * stride_biasm + rn[None, :] * stride_biasn
        bias = tl.load(bias_ptrs, mask=inside, other=0.0).to(tl.float32)
        if SCALED:
            bias = bias * beta
        acc = acc + bias
    c_ptrs = c_ptr + z * stride_cz + rm[:, None] * stride_cm + rn[None, :] * stride_cn
    tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=inside)


def matmul(
    a: torch.Tensor,
    b: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    alpha: float = 1.0,
    beta: float = 1.0,
) -> torch.Tensor:
    """`beta * bias + alpha * (a @ b)`, each output element in a fixed order whatever the row count.

    a [M, K] or [Z, M, K]; b [K, N] or [Z, K, N] (any strides); bias broadcastable to the output
    [M, N] / [Z, M, N] or None. a, b (and bias) share one dtype of `SUPPORTED_DTYPES`; the output has
    that dtype, accumulation is float32. With alpha = beta = 1 nothing is scaled (no extra rounding).
    """
    batched = a.dim() == 3
    a3 = a if batched else a.unsqueeze(0)
    b3 = b if batched else b.unsqueeze(0)
    z, m, k = a3.shape
    n = b3.shape[2]
    if b3.shape[0] != z or b3.shape[1] != k:
        raise ValueError(f"matmul shapes {tuple(a.shape)} @ {tuple(b.shape)} do not agree")
    out = torch.empty((z, m, n), dtype=a.dtype, device=a.device)
    if out.numel() == 0:
        return out if batched else out[0]
    scaled = alpha != 1.0 or beta != 1.0
    if bias is not None:
        bias3 = bias.expand(out.shape)  # broadcast dimensions get stride 0: no copy
        bias_args = (bias3, *bias3.stride())
    else:
        bias_args = (out, 0, 0, 0)  # never read (HAS_BIAS is off)
    block_m, block_n, block_k = MATMUL_TILES[a.dtype]
    precision = float32_precision() if a.dtype == torch.float32 else "ieee"
    grid = (triton.cdiv(m, block_m), triton.cdiv(n, block_n), z)
    _matmul_kernel[grid](
        a3, b3, out, bias_args[0],
        m, n, k,
        *a3.stride(), *b3.stride(), *out.stride(), *bias_args[1:],
        float(alpha), float(beta),
        HAS_BIAS=bias is not None, SCALED=scaled,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, PRECISION=precision,
        num_warps=MATMUL_WARPS, num_stages=MATMUL_STAGES,
    )
    return out if batched else out[0]


@triton.jit
def _softmax_kernel(x_ptr, y_ptr, R, n, stride_x, stride_y, LOG: tl.constexpr, ROWS: tl.constexpr,
                    BLOCK: tl.constexpr):
    rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    valid = rows < R
    cols = tl.arange(0, BLOCK)
    x_rows = x_ptr + rows[:, None] * stride_x
    y_rows = y_ptr + rows[:, None] * stride_y
    # Pass 1: each row's maximum (exact in any order).
    top = tl.full((ROWS, BLOCK), float("-inf"), dtype=tl.float32)
    for start in range(0, n, BLOCK):
        inside = valid[:, None] & (start + cols[None, :] < n)
        x = tl.load(x_rows + start + cols[None, :], mask=inside, other=float("-inf")).to(tl.float32)
        top = tl.maximum(top, x)
    peak = tl.where(valid, tl.max(top, axis=1), 0.0)  # lanes past the last row stay finite
    # Pass 2: per-lane sums across chunks, then one fixed tree per row.
    lanes = tl.zeros((ROWS, BLOCK), dtype=tl.float32)
    for start in range(0, n, BLOCK):
        inside = valid[:, None] & (start + cols[None, :] < n)
        x = tl.load(x_rows + start + cols[None, :], mask=inside, other=float("-inf")).to(tl.float32)
        lanes += tl.exp(x - peak[:, None])
    total = tl.where(valid, tl.sum(lanes, axis=1), 1.0)
    log_total = tl.log(total)
    # Pass 3: write.
    for start in range(0, n, BLOCK):
        inside = valid[:, None] & (start + cols[None, :] < n)
        x = tl.load(x_rows + start + cols[None, :], mask=inside, other=0.0).to(tl.float32)
        if LOG:
            y = x - peak[:, None] - log_total[:, None]
        else:
            y = tl.exp(x - peak[:, None]) / total[:, None]
        tl.store(y_rows + start + cols[None, :], y.to(y_ptr.dtype.element_ty), mask=inside)


def _rows(x: torch.Tensor, dim: int) -> tuple[torch.Tensor, int]:
    """`x` with `dim` moved last, contiguous, viewed as [rows, n]; and n."""
    moved = x.movedim(dim, -1).contiguous()
    n = moved.shape[-1] if moved.dim() else 1
    return moved.reshape(-1, n), n


def softmax(x: torch.Tensor, dim: int, *, log: bool = False, out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """Softmax (or log-softmax) over `dim`, computed in float32, one program per row.

    x: any shape, a dtype of `SUPPORTED_DTYPES`; returns x's shape in `out_dtype` (default x.dtype).
    """
    dim = dim % max(x.dim(), 1)
    rows, n = _rows(x, dim)
    out = torch.empty(rows.shape, dtype=out_dtype or x.dtype, device=x.device)
    if out.numel():
        per_program, block = row_tile(n)
        grid = (triton.cdiv(rows.shape[0], per_program),)
        _softmax_kernel[grid](rows, out, rows.shape[0], n, rows.stride(0), out.stride(0), LOG=log,
                              ROWS=per_program, BLOCK=block)
    moved_shape = x.movedim(dim, -1).shape
    return out.reshape(moved_shape).movedim(-1, dim)


@triton.jit
def _row_reduce_kernel(x_ptr, y_ptr, R, n, stride_x, MEAN: tl.constexpr, ROWS: tl.constexpr, BLOCK: tl.constexpr):
    rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    valid = rows < R
    cols = tl.arange(0, BLOCK)
    lanes = tl.zeros((ROWS, BLOCK), dtype=tl.float32)
    for start in range(0, n, BLOCK):
        inside = valid[:, None] & (start + cols[None, :] < n)
        lanes += tl.load(x_ptr + rows[:, None] * stride_x + start + cols[None, :], mask=inside, other=0.0).to(
            tl.float32)
    total = tl.sum(lanes, axis=1)
    if MEAN:
        total = total / n
    tl.store(y_ptr + rows, total.to(y_ptr.dtype.element_ty), mask=valid)


def _row_reduce(rows: torch.Tensor, out_dtype: torch.dtype | None, mean: bool) -> torch.Tensor:
    r, n = rows.shape
    out = torch.empty((r,), dtype=out_dtype or rows.dtype, device=rows.device)
    if r == 0:
        return out
    if n == 0:
        return out.fill_(float("nan") if mean else 0.0)  # as torch.mean / torch.sum of an empty set
    per_program, block = row_tile(n)
    _row_reduce_kernel[(triton.cdiv(r, per_program),)](rows, out, r, n, rows.stride(0), MEAN=mean,
                                                       ROWS=per_program, BLOCK=block)
    return out


def row_mean(rows: torch.Tensor, out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """The mean of each row of `rows` [R, n] (inner stride 1), accumulated in float32: [R] in `out_dtype`."""
    return _row_reduce(rows, out_dtype, mean=True)


def row_sum(rows: torch.Tensor, out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """The sum of each row of `rows` [R, n] (inner stride 1), accumulated in float32: [R] in `out_dtype`."""
    return _row_reduce(rows, out_dtype, mean=False)


@triton.jit
def _layer_norm_kernel(
    x_ptr, w_ptr, b_ptr, y_ptr, mean_ptr, rstd_ptr, R, n, stride_x, stride_y, eps,
    HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, ROWS: tl.constexpr, BLOCK: tl.constexpr,
):
    rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    valid = rows < R
    cols = tl.arange(0, BLOCK)
    x_rows = x_ptr + rows[:, None] * stride_x
    lanes = tl.zeros((ROWS, BLOCK), dtype=tl.float32)
    for start in range(0, n, BLOCK):
        inside = valid[:, None] & (start + cols[None, :] < n)
        lanes += tl.load(x_rows + start + cols[None, :], mask=inside, other=0.0).to(tl.float32)
    mean = tl.sum(lanes, axis=1) / n
    # Two passes (mean, then squared deviations): as exact as Welford, and a fixed order.
    lanes = tl.zeros((ROWS, BLOCK), dtype=tl.float32)
    for start in range(0, n, BLOCK):
        inside = valid[:, None] & (start + cols[None, :] < n)
        x = tl.load(x_rows + start + cols[None, :], mask=inside, other=0.0).to(tl.float32)
        d = tl.where(inside, x - mean[:, None], 0.0)
        lanes += d * d
    rstd = 1.0 / tl.sqrt(tl.sum(lanes, axis=1) / n + eps)
    tl.store(mean_ptr + rows, mean, mask=valid)
    tl.store(rstd_ptr + rows, rstd, mask=valid)
    for start in range(0, n, BLOCK):
        inside = valid[:, None] & (start + cols[None, :] < n)
        x = tl.load(x_rows + start + cols[None, :], mask=inside, other=0.0).to(tl.float32)
        y = (x - mean[:, None]) * rstd[:, None]
        if HAS_WEIGHT:
            y = y * tl.load(w_ptr + start + cols, mask=start + cols < n, other=0.0).to(tl.float32)[None, :]
        if HAS_BIAS:
            y = y + tl.load(b_ptr + start + cols, mask=start + cols < n, other=0.0).to(tl.float32)[None, :]
        tl.store(y_ptr + rows[:, None] * stride_y + start + cols[None, :], y.to(y_ptr.dtype.element_ty), mask=inside)


def layer_norm(
    rows: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None, eps: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """LayerNorm of each row of `rows` [R, n] (contiguous): (y [R, n] in rows.dtype, mean [R], rstd [R]).

    weight, bias: [n] contiguous or None. mean and rstd are float32 (as PyTorch's CUDA kernel keeps
    them for 16-bit inputs).
    """
    r, n = rows.shape
    y = torch.empty_like(rows)
    mean = torch.empty((r,), dtype=torch.float32, device=rows.device)
    rstd = torch.empty((r,), dtype=torch.float32, device=rows.device)
    if r and n:
        per_program, block = row_tile(n)
        _layer_norm_kernel[(triton.cdiv(r, per_program),)](
            rows, weight if weight is not None else rows, bias if bias is not None else rows, y, mean, rstd,
            r, n, rows.stride(0), y.stride(0), float(eps),
            HAS_WEIGHT=weight is not None, HAS_BIAS=bias is not None, ROWS=per_program, BLOCK=block,
        )
    return y, mean, rstd
