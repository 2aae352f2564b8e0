"""The JAX mask encoder against an independent implementation: torch `Conv2d` with explicit
TensorFlow-SAME padding and a plain numpy nearest-codebook search, on random weights with odd and
even kernel sizes."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from make_vae_fixture import make_vae_checkpoint
from segmentation.encoder import MaskEncoder
from segmentation.model.vae import BUCKETS


def random_checkpoint(seed: int, down_kernel: int, res_kernel: int) -> dict[str, np.ndarray]:
    """The fixture layout with the encoder's kernels resized (channels kept), He-scaled."""
    weights = make_vae_checkpoint(seed)
    rng = np.random.default_rng(seed + 100)
    for key in list(weights):
        if not key.startswith("encoder.") or not key.endswith(".weight"):
            continue
        out, cin, kernel, _ = weights[key].shape
        if key.removesuffix(".weight") in ("encoder.0", "encoder.2", "encoder.4", "encoder.6"):
            kernel = down_kernel
        elif kernel == 3:
            kernel = res_kernel
        weights[key] = rng.normal(0, np.sqrt(2 / (cin * kernel * kernel)), (out, cin, kernel, kernel)).astype(
            np.float32)
    return weights


def tf_same_pad(x: torch.Tensor, kernel: int, stride: int) -> torch.Tensor:
    """TensorFlow's SAME rule written out: total padding so that out = ceil(in / stride), the odd
    pixel going after (bottom/right)."""
    size = x.shape[-1]
    out = -(-size // stride)
    total = max((out - 1) * stride + kernel - size, 0)
    return F.pad(x, (total // 2, total - total // 2, total // 2, total - total // 2))


def reference_codes(weights: dict[str, np.ndarray], masks: np.ndarray) -> np.ndarray:
    def conv(x, name, stride):
        w = torch.from_numpy(weights[f"{name}.weight"]).double()
        b = torch.from_numpy(weights[f"{name}.bias"]).double()
        return F.conv2d(tf_same_pad(x, w.shape[-1], stride), w, b, stride=stride)

    x = torch.from_numpy(masks).double()[:, None] * 2 - 1
    with torch.no_grad():
        for name in ("encoder.0", "encoder.2", "encoder.4", "encoder.6"):
            x = torch.relu(conv(x, name, 2))
        for block in ("encoder.8.net", "encoder.9.net"):
            h = torch.relu(conv(x, f"{block}.0", 1))
            h = torch.relu(conv(h, f"{block}.2", 1))
            x = x + conv(h, f"{block}.4", 1)
        x = conv(x, "encoder.10", 1)
    cells = x.permute(0, 2, 3, 1).reshape(len(masks), -1, x.shape[1]).numpy()  # row-major 4x4 grid
    embedding = weights["_vq_vae._embedding"].astype(np.float64)
    distances = ((cells[:, :, None, :] - embedding[None, None]) ** 2).sum(-1)
    return distances.argmin(-1)


def random_masks(seed: int, n: int) -> np.ndarray:
    """Blocky random masks with soft edges: values across the whole of [0, 1]."""
    rng = np.random.default_rng(seed)
    coarse = rng.random((n, 8, 8))
    return np.clip(np.kron(coarse, np.ones((8, 8))) + rng.normal(0, 0.1, (n, 64, 64)), 0, 1).astype(np.float32)


@pytest.mark.parametrize(("down_kernel", "res_kernel"), [(4, 3), (3, 3), (5, 1), (2, 5)])
def test_codes_equal_torch_with_tf_same_padding(tmp_path, down_kernel, res_kernel):
    weights = random_checkpoint(down_kernel * 10 + res_kernel, down_kernel, res_kernel)
    np.savez(tmp_path / "v.npz", **weights)
    masks = random_masks(down_kernel, 20)
    codes = MaskEncoder.from_npz(tmp_path / "v.npz").encode(masks)
    assert codes.shape == (20, 16) and codes.dtype == np.int32
    np.testing.assert_array_equal(codes, reference_codes(weights, masks))
    assert len(np.unique(codes)) > 10  # the comparison means something: many different codes


def test_odd_kernel_padding_is_not_pytorch_symmetric(tmp_path):
    """With 3x3 stride-2 convs, PyTorch's padding=1 differs from SAME: the encoder must follow SAME."""
    weights = random_checkpoint(3, 3, 3)
    np.savez(tmp_path / "v.npz", **weights)
    masks = random_masks(5, 16)
    x = torch.from_numpy(masks)[:, None] * 2 - 1
    w = torch.from_numpy(weights["encoder.0.weight"])
    b = torch.from_numpy(weights["encoder.0.bias"])
    symmetric = F.conv2d(x, w, b, stride=2, padding=1)
    same = F.conv2d(tf_same_pad(x, 3, 2), w, b, stride=2)
    assert symmetric.shape == same.shape and not torch.allclose(symmetric, same)
    np.testing.assert_array_equal(MaskEncoder.from_npz(tmp_path / "v.npz").encode(masks),
                                  reference_codes(weights, masks))


@pytest.fixture(scope="module")
def encoder(tmp_path_factory):
    path = tmp_path_factory.mktemp("enc") / "v.npz"
    np.savez(path, **make_vae_checkpoint(seed=3))
    enc = MaskEncoder.from_npz(path)
    enc.warmup()
    return enc


def test_batched_equals_one_at_a_time_and_no_recompilation(encoder):
    traced = encoder.trace_count
    assert traced == len(BUCKETS)
    masks = random_masks(9, 70)
    together = encoder.encode(masks)
    alone = np.concatenate([encoder.encode(m[None]) for m in masks])
    np.testing.assert_array_equal(together, alone)
    assert encoder.trace_count == traced


def test_bool_masks_and_empty_batch(encoder):
    masks = random_masks(2, 3) > 0.5
    np.testing.assert_array_equal(encoder.encode(masks), encoder.encode(masks.astype(np.float32)))
    assert encoder.encode(np.zeros((0, 64, 64))).shape == (0, 16)


@pytest.mark.parametrize(
    ("masks", "message"),
    [(np.zeros((2, 32, 32)), r"\[N, 64, 64\]"), (np.zeros((64, 64)), r"\[N, 64, 64\]"),
     (np.full((1, 64, 64), 1.5), r"\[0, 1\]"), (np.full((1, 64, 64), -0.1), r"\[0, 1\]"),
     (np.full((1, 64, 64), np.nan), r"\[0, 1\]"), (np.full((1, 64, 64), "a"), "dtype")],
)
def test_bad_masks(encoder, masks, message):
    with pytest.raises(ValueError, match=message):
        encoder.encode(masks)


def test_checkpoint_without_encoder_is_named(tmp_path):
    weights = {k: v for k, v in make_vae_checkpoint().items() if not k.startswith("encoder.9")}
    np.savez(tmp_path / "dec-only.npz", **weights)
    with pytest.raises(ValueError, match=r"dec-only\.npz.*encoder\.9\.net\.0\.weight"):
        MaskEncoder.from_npz(tmp_path / "dec-only.npz")


def test_broken_channel_chain_is_named(tmp_path):
    weights = make_vae_checkpoint()
    weights["encoder.2.weight"] = weights["encoder.2.weight"][:, :8]
    np.savez(tmp_path / "v.npz", **weights)
    with pytest.raises(ValueError, match=r"encoder\.2\.weight.*\[out, 16, kh, kw\]"):
        MaskEncoder.from_npz(tmp_path / "v.npz")
