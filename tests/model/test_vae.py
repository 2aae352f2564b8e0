"""The JAX mask decoder against an independent PyTorch implementation of the same checkpoint."""

import numpy as np
import pytest
import torch

from make_vae_fixture import make_vae_checkpoint
from segmentation.model.vae import BUCKETS, MaskDecoder, expected_shapes
from train_vae_fixture import build_vae


@pytest.fixture(scope="module")
def npz(tmp_path_factory):
    path = tmp_path_factory.mktemp("vae") / "vae-oid.npz"
    np.savez(path, **make_vae_checkpoint(seed=7))
    return path


@pytest.fixture(scope="module")
def decoder(npz):
    d = MaskDecoder.from_npz(npz)
    d.warmup()
    return d


def torch_decoder(weights):
    """The UViM decoder as PyTorch layers (the fixture trainer's, indexed like the checkpoint's keys)."""
    vae = build_vae()
    vae.load_state_dict({k: torch.from_numpy(v) for k, v in weights.items()})
    layers = vae.decoder
    embedding = torch.from_numpy(weights["_vq_vae._embedding"])

    def decode(codes):
        x = embedding[torch.from_numpy(codes).long()].reshape(-1, 4, 4, 512).permute(0, 3, 1, 2)
        with torch.no_grad():
            return layers(x)[:, 0].numpy()

    return decode


@pytest.mark.parametrize("n", [1, 5, 16, 70])
def test_matches_torch_reference(decoder, n):
    reference = torch_decoder(make_vae_checkpoint(seed=7))
    codes = np.random.default_rng(n).integers(0, 128, (n, 16))
    expected = reference(codes)
    got = decoder.decode(codes)
    assert got.shape == (n, 64, 64) and got.dtype == np.float32
    assert np.abs(got - expected).max() / np.abs(expected).max() <= 1e-5


def test_output_has_both_signs_and_depends_on_codes(decoder):
    codes = np.random.default_rng(0).integers(0, 128, (4, 16))
    out = decoder.decode(codes)
    assert (out > 0).any() and (out < 0).any()
    assert not np.allclose(out[0], out[1])


@pytest.mark.parametrize("seed", [0, 1, 7])
def test_fixture_masks_span_about_minus_one_to_one_and_are_never_empty_or_full(tmp_path, seed):
    """What the fixture promises the rest of the tests: pasted masks are neither empty nor full."""
    np.savez(tmp_path / "v.npz", **make_vae_checkpoint(seed=seed))
    out = MaskDecoder.from_npz(tmp_path / "v.npz").decode(np.random.default_rng(seed).integers(0, 128, (64, 16)))
    assert 0.3 <= np.percentile(np.abs(out), 99) <= 3
    positive = (out > 0).mean(axis=(1, 2))
    assert positive.min() >= 0.1 and positive.max() <= 0.9


def test_empty_batch(decoder):
    assert decoder.decode(np.zeros((0, 16), np.int32)).shape == (0, 64, 64)


def test_no_recompilation_after_warmup(decoder):
    traced = decoder.trace_count
    assert traced == len(BUCKETS)
    for n in (1, 3, 16, 17, 64, 100, 2):
        decoder.decode(np.zeros((n, 16), np.int32))
    assert decoder.trace_count == traced


def test_padding_does_not_change_results(decoder):
    codes = np.random.default_rng(3).integers(0, 128, (20, 16))
    together = decoder.decode(codes)
    alone = np.stack([decoder.decode(c[None])[0] for c in codes])
    np.testing.assert_allclose(together, alone, atol=1e-5)


def test_runs_on_the_cpu(decoder):
    assert decoder.device.platform == "cpu"


@pytest.mark.parametrize(
    ("codes", "message"),
    [(np.zeros((2, 15), np.int32), r"\[N, 16\]"), (np.full((1, 16), 128), "0..127"),
     (np.full((1, 16), -1), "0..127"), (np.zeros(16, np.int32), r"\[N, 16\]"),
     (np.full((1, 16), 1.5), "integers"), (np.full((1, 16), "7"), "integers"), (np.zeros((0, 16)), "integers")],
)
def test_bad_codes(decoder, codes, message):
    with pytest.raises(ValueError, match=message):
        decoder.decode(codes)


def test_missing_key_is_named(tmp_path):
    weights = make_vae_checkpoint()
    del weights["decoder.6.weight"]
    np.savez(tmp_path / "v.npz", **weights)
    with pytest.raises(ValueError, match=r"v\.npz.*decoder\.6\.weight"):
        MaskDecoder.from_npz(tmp_path / "v.npz")


def test_wrong_shape_is_named(tmp_path):
    weights = make_vae_checkpoint()
    weights["decoder.4.weight"] = weights["decoder.4.weight"].transpose(1, 0, 3, 2)[:64]
    np.savez(tmp_path / "v.npz", **weights)
    with pytest.raises(ValueError, match=r"decoder\.4\.weight.*expected \(128, 128, 4, 4\)"):
        MaskDecoder.from_npz(tmp_path / "v.npz")


def test_missing_file_is_named(tmp_path):
    with pytest.raises(ValueError, match=r"nothere\.npz.*not found"):
        MaskDecoder.from_npz(tmp_path / "nothere.npz")


def test_corrupt_file_is_named(tmp_path):
    (tmp_path / "v.npz").write_bytes(b"PK\x03\x04 not really a zip")
    with pytest.raises(ValueError, match=r"v\.npz: not a readable npz"):
        MaskDecoder.from_npz(tmp_path / "v.npz")


def test_encoder_tensors_are_ignored_and_layout_is_complete():
    weights = make_vae_checkpoint()
    assert any(k.startswith("encoder.") for k in weights)
    assert set(expected_shapes()) <= set(weights)
