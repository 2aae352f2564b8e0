"""The batch-invariant Triton kernels on the CPU under Triton's interpreter: each against PyTorch, and
each row of a batch of N equal, bit for bit, to the same row computed alone (and among other rows).

float32 and float16 only: under the interpreter bfloat16 inputs read wrongly (GPU-only). The
interpreter's `tl.dot` is swapped for a position-invariant one (see
segmentation/model/invariant/interpreter.py) where a test is about invariance.
"""

from __future__ import annotations

import pytest
import torch
from invariant_helpers import load_kernels

from segmentation.model.invariant.interpreter import position_invariant_dot

kernels = load_kernels()

BATCHES = (1, 2, 3, 7, 16, 33, 64)
DTYPES = (torch.float32, torch.float16)
TOLERANCE = {torch.float32: dict(atol=2e-5, rtol=2e-5), torch.float16: dict(atol=2e-2, rtol=2e-2)}


def randn(*shape, dtype=torch.float32, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=generator).to(dtype)


@pytest.fixture(autouse=True)
def ordered_dot():
    with position_invariant_dot():
        yield


@pytest.mark.parametrize("dtype", DTYPES)
def test_matmul_matches_torch(dtype):
    a, b, bias = randn(37, 50, dtype=dtype), randn(50, 70, dtype=dtype, seed=1), randn(70, dtype=dtype, seed=2)
    reference = a.double() @ b.double()
    torch.testing.assert_close(kernels.matmul(a, b).double(), reference, **TOLERANCE[dtype])
    torch.testing.assert_close(kernels.matmul(a, b, bias).double(), reference + bias.double(), **TOLERANCE[dtype])
    # alpha/beta and a bias broadcast along the other axis ([M, 1]), as addmm allows.
    column = randn(37, 1, dtype=dtype, seed=3)
    scaled = kernels.matmul(a, b, column, alpha=0.5, beta=2.0).double()
    torch.testing.assert_close(scaled, 0.5 * reference + 2.0 * column.double(), **TOLERANCE[dtype])
    # Transposed operands (a weight read as W.t(), keys as K^T) through strides, no copies.
    weight = randn(70, 50, dtype=dtype, seed=4)
    torch.testing.assert_close(kernels.matmul(a, weight.t()).double(), a.double() @ weight.double().t(),
                               **TOLERANCE[dtype])


@pytest.mark.parametrize("dtype", DTYPES)
def test_batched_matmul_matches_torch(dtype):
    a, b = randn(5, 19, 16, dtype=dtype), randn(5, 23, 16, dtype=dtype, seed=1).transpose(1, 2)
    bias = randn(5, 1, 23, dtype=dtype, seed=2)
    torch.testing.assert_close(kernels.matmul(a, b, bias).double(), a.double() @ b.double() + bias.double(),
                               **TOLERANCE[dtype])
    assert kernels.matmul(a[:0], b[:0]).shape == (0, 19, 23)


@pytest.mark.parametrize("dtype", DTYPES)
def test_matmul_rows_are_batch_invariant(dtype):
    # K = 75 and N = 130 are not multiples of any tile; 64 rows span two row tiles of the fp32 config.
    rows, weight, bias = randn(64, 75, dtype=dtype), randn(130, 75, dtype=dtype, seed=1), randn(130, dtype=dtype)
    alone = [kernels.matmul(rows[i:i + 1], weight.t(), bias)[0] for i in range(64)]
    for n in BATCHES:
        batch = kernels.matmul(rows[:n], weight.t(), bias)
        for i in range(n):
            assert torch.equal(batch[i], alone[i]), (n, i)
    # Composition: row 5 among other rows (reversed order, different neighbours) is still the same.
    shuffled = kernels.matmul(rows.flip(0), weight.t(), bias)
    assert torch.equal(shuffled[63 - 5], alone[5])


def test_batched_matmul_is_invariant_in_the_number_of_matrices():
    # Attention-shaped: [Z, M, K] @ [Z, K, N] with Z = batch x heads; matrix z alone or among others.
    a, b = randn(12, 9, 16), randn(12, 16, 41, seed=1)
    together = kernels.matmul(a, b)
    for z in (0, 5, 11):
        assert torch.equal(kernels.matmul(a[z:z + 1], b[z:z + 1])[0], together[z])
        # and its first query row alone (a decode step's single query)
        assert torch.equal(kernels.matmul(a[z:z + 1, :1], b[z:z + 1])[0, 0], together[z, 0])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("log", [False, True])
def test_softmax_matches_torch(dtype, log):
    x = randn(3, 37, 300, dtype=dtype) * 4
    reference = (torch.log_softmax if log else torch.softmax)(x.double(), -1)
    torch.testing.assert_close(kernels.softmax(x, -1, log=log, out_dtype=torch.float32).double(), reference,
                               atol=1e-6, rtol=1e-5)
    # Another dim (moved last and back) and the input dtype kept.
    out = kernels.softmax(x, 1, log=log)
    assert out.dtype == dtype and out.shape == x.shape
    torch.testing.assert_close(out.double(), (torch.log_softmax if log else torch.softmax)(x.double(), 1),
                               **TOLERANCE[dtype])
    # Masked entries (-inf), as an additive attention mask makes them.
    masked = x.float().masked_fill(torch.arange(300) < 120, float("-inf"))
    torch.testing.assert_close(kernels.softmax(masked, -1, log=log).double(),
                               (torch.log_softmax if log else torch.softmax)(masked.double(), -1), atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("n, log", [(37, False), (300, True), (5000, False)])  # 5000: two chunks of 4096
def test_softmax_rows_are_batch_invariant(n, log):
    x = randn(64, n) * 3
    alone = [kernels.softmax(x[i:i + 1], -1, log=log)[0] for i in range(64)]
    for batch in BATCHES:
        out = kernels.softmax(x[:batch], -1, log=log)
        assert all(torch.equal(out[i], alone[i]) for i in range(batch)), batch


@pytest.mark.parametrize("dtype", DTYPES)
def test_row_mean_and_sum_match_torch(dtype):
    x = randn(29, 5000, dtype=dtype)
    torch.testing.assert_close(kernels.row_mean(x, torch.float32).double(), x.double().mean(-1), atol=1e-6,
                               rtol=1e-5)
    torch.testing.assert_close(kernels.row_sum(x, torch.float32).double(), x.double().sum(-1), atol=1e-3,
                               rtol=1e-5)
    assert kernels.row_mean(x[:, :0]).isnan().all() and (kernels.row_sum(x[:, :0]) == 0).all()


@pytest.mark.parametrize("n", [64, 2304, 5000])
def test_row_mean_is_batch_invariant(n):
    x = randn(64, n) ** 2  # RMSNorm's x.pow(2).mean(-1)
    alone = torch.stack([kernels.row_mean(x[i:i + 1])[0] for i in range(64)])
    for batch in BATCHES:
        assert torch.equal(kernels.row_mean(x[:batch]), alone[:batch]), batch


@pytest.mark.parametrize("dtype", DTYPES)
def test_layer_norm_matches_torch(dtype):
    x, weight, bias = randn(40, 1152, dtype=dtype) * 3 + 1, randn(1152, dtype=dtype, seed=1), randn(1152, dtype=dtype)
    out, mean, rstd = kernels.layer_norm(x, weight, bias, 1e-6)
    reference = torch.nn.functional.layer_norm(x.double(), (1152,), weight.double(), bias.double(), 1e-6)
    torch.testing.assert_close(out.double(), reference, **TOLERANCE[dtype])
    torch.testing.assert_close(mean.double(), x.double().mean(-1), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(rstd.double(), 1 / (x.double().var(-1, unbiased=False) + 1e-6).sqrt(), atol=1e-5,
                               rtol=1e-4)
    bare, _, _ = kernels.layer_norm(x, None, None, 1e-6)
    torch.testing.assert_close(bare.double(), torch.nn.functional.layer_norm(x.double(), (1152,), eps=1e-6),
                               **TOLERANCE[dtype])


def test_layer_norm_rows_are_batch_invariant():
    x, weight, bias = randn(64, 1152) * 2, randn(1152, seed=1), randn(1152, seed=2)
    alone = [kernels.layer_norm(x[i:i + 1], weight, bias, 1e-6)[0][0] for i in range(64)]
    for batch in BATCHES:
        out = kernels.layer_norm(x[:batch], weight, bias, 1e-6)[0]
        assert all(torch.equal(out[i], alone[i]) for i in range(batch)), batch


def test_tiles_do_not_depend_on_the_row_count():
    # The configuration is a function of what a row keeps (dtype, row length), never of M.
    assert set(kernels.MATMUL_TILES) == set(kernels.SUPPORTED_DTYPES)
    assert kernels.row_tile(5000) == (1, 4096) and kernels.row_tile(37) == (64, 64)
