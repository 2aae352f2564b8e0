#!/usr/bin/env python
"""Train a fixture VQ-VAE that has learned masks, in the exact layout of big_vision's vae-oid.npz.

    python scripts/train_vae_fixture.py OUT.npz              # train (or take from the cache) and copy
    python scripts/train_vae_fixture.py --evaluate OUT.npz   # and print the held-out median IoU

Random VAE weights make every round trip (mask → codes → mask) meaningless, so the fixtures use a
VAE trained here on synthetic shapes: ellipses and polygons, round and thin, large and small, cropped
to their tight box and resized to 64×64 as `segmentation.data.targets` does. The architecture is the
real one (encoder: four stride-2 4×4 convs 1→16→32→64→128 with relu, two residual blocks, a 1×1 conv
to 512; a 128×512 codebook; the decoder of FIELD-NOTES), and the keys and shapes are those of
`vae-oid.npz`, so the JAX encoder and decoder read the result like the real file.

Training is deterministic (fixed seeds, one thread, a fixed number of steps); it prints its time. The
result is cached under `$XDG_CACHE_HOME/paligemma-seg/` (default
`~/.cache`), keyed by this file's hash and the seed, so a test run or `make demo` trains it once per
machine; it is never committed.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

MASK_SIZE = 64
NUM_CODES = 128
EMBEDDING_DIM = 512
TRAIN_STEPS = 1500
BATCH = 16
LEARNING_RATE = 2e-3
TRAIN_SHAPES = 6144
# One thread: the result is the same on every machine, and on busy shared cores a second thread
# mostly waits for the first.
THREADS = 1


# ---- synthetic shapes -------------------------------------------------------------------------------

def random_shape_mask(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """One filled shape somewhere in a `[height, width]` bool mask: an ellipse (round or thin, any
    angle) or a star-convex polygon of 3..9 vertices. Never empty."""
    while True:
        mask = np.zeros((height, width), np.uint8)
        side = min(height, width)
        center = (float(rng.uniform(0.15, 0.85) * width), float(rng.uniform(0.15, 0.85) * height))
        size = rng.uniform(0.06, 0.45) * side
        if rng.random() < 0.5:
            thinness = rng.choice([1.0, rng.uniform(0.3, 1.0), rng.uniform(0.08, 0.3)])
            axes = (max(1, int(size)), max(1, int(size * thinness)))
            cv2.ellipse(mask, (int(center[0]), int(center[1])), axes, float(rng.uniform(0, 180)), 0, 360, 1, -1)
        else:
            vertices = int(rng.integers(3, 10))
            angles = np.sort(rng.uniform(0, 2 * np.pi, vertices))
            radii = size * rng.uniform(0.35, 1.0, vertices)
            stretch = rng.choice([1.0, rng.uniform(0.1, 0.5)])
            rotation = rng.uniform(0, 2 * np.pi)
            xs, ys = radii * np.cos(angles), radii * np.sin(angles) * stretch
            xr = xs * np.cos(rotation) - ys * np.sin(rotation) + center[0]
            yr = xs * np.sin(rotation) + ys * np.cos(rotation) + center[1]
            points = np.stack([xr, yr], axis=1).round().astype(np.int32)
            cv2.fillPoly(mask, [points], 1)
        if mask.any():
            return mask.astype(bool)


def random_scene(rng: np.random.Generator, height: int, width: int, objects: int) -> list[np.ndarray]:
    """`objects` shape masks of one `[height, width]` image (they may overlap, like COCO objects)."""
    return [random_shape_mask(rng, height, width) for _ in range(objects)]


def crop_to_64(mask: np.ndarray) -> np.ndarray:
    """The mask's tight box resized to 64×64, float32 in [0, 1] (area averaging when shrinking).

    The training data only; `segmentation.data.targets` makes the real targets with JAX's resize.
    """
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    crop = mask[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1].astype(np.float32)
    shrink = crop.shape[0] > MASK_SIZE and crop.shape[1] > MASK_SIZE
    resized = cv2.resize(crop, (MASK_SIZE, MASK_SIZE), interpolation=cv2.INTER_AREA if shrink else cv2.INTER_LINEAR)
    return np.clip(resized, 0.0, 1.0)


def training_masks(seed: int, count: int) -> np.ndarray:
    """`[count, 64, 64]` float32 crops of random shapes on random canvases (32..256 px a side)."""
    rng = np.random.default_rng(seed)
    out = np.empty((count, MASK_SIZE, MASK_SIZE), np.float32)
    for i in range(count):
        height, width = (int(v) for v in rng.integers(32, 257, 2))
        out[i] = crop_to_64(random_shape_mask(rng, height, width))
    return out


# ---- the model, named like the checkpoint -----------------------------------------------------------

def build_vae():
    """A torch module whose `state_dict()` keys and shapes are exactly those of vae-oid.npz."""
    import torch
    from torch import nn

    class ResBlock(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = nn.Sequential(nn.Conv2d(128, 128, 3, padding=1), nn.ReLU(), nn.Conv2d(128, 128, 3, padding=1),
                                     nn.ReLU(), nn.Conv2d(128, 128, 1))

        def forward(self, x):
            return x + self.net(x)

    class Codebook(nn.Module):
        def __init__(self):
            super().__init__()
            self._embedding = nn.Parameter(torch.zeros(NUM_CODES, EMBEDDING_DIM))

    class VAE(nn.Module):
        def __init__(self):
            super().__init__()
            # Kernel 4, stride 2, padding 1 on even sides is TensorFlow's SAME padding (1 before, 1 after).
            downs = []
            for cin, cout in ((1, 16), (16, 32), (32, 64), (64, 128)):
                downs += [nn.Conv2d(cin, cout, 4, stride=2, padding=1), nn.ReLU()]
            self.encoder = nn.Sequential(*downs, ResBlock(), ResBlock(), nn.Conv2d(128, EMBEDDING_DIM, 1))
            ups = []
            for cin, cout in ((128, 128), (128, 64), (64, 32), (32, 16)):
                ups += [nn.ConvTranspose2d(cin, cout, 4, stride=2, padding=1), nn.ReLU()]
            self.decoder = nn.Sequential(nn.Conv2d(EMBEDDING_DIM, 128, 1), nn.ReLU(), ResBlock(), ResBlock(), *ups,
                                         nn.Conv2d(16, 1, 1))
            self._vq_vae = Codebook()

    return VAE()


def quantize(z, codebook):
    """Nearest codebook entry of each row of `z` by squared distance (the encoder's rule); with
    unit-norm entries that is the entry of largest dot product. (codes, entries)."""
    codes = (z.detach() @ codebook.detach().T).argmax(dim=1)
    return codes, codebook[codes]


def train(seed: int = 0, steps: int = TRAIN_STEPS, log=print) -> dict[str, np.ndarray]:
    """Train the VQ-VAE; its weights as the checkpoint's `{key: float32 array}`.

    The codebook entries are kept at unit norm (cosine VQ): nearest-by-squared-distance then only
    depends on the direction of the encoder output, which keeps all 128 codes in use; codes left
    unused for 25 steps restart on random encoder outputs.
    """
    import torch
    import torch.nn.functional as F

    torch.set_num_threads(THREADS)
    torch.manual_seed(seed)
    masks = torch.from_numpy(training_masks(seed, TRAIN_SHAPES))[:, None]
    model = build_vae()
    codebook = model._vq_vae._embedding
    optimizer = torch.optim.Adam(model.parameters(), lr=LEARNING_RATE)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=LEARNING_RATE, total_steps=steps,
                                                   pct_start=0.1)
    order = torch.Generator().manual_seed(seed)
    usage = torch.zeros(NUM_CODES)
    with torch.no_grad():
        codebook.copy_(F.normalize(torch.randn(NUM_CODES, EMBEDDING_DIM, generator=order), dim=1))
    for step in range(steps):
        batch = masks[torch.randint(0, len(masks), (BATCH,), generator=order)]
        z = F.normalize(model.encoder(batch * 2 - 1).permute(0, 2, 3, 1).reshape(-1, EMBEDDING_DIM), dim=1)
        codes, quantized = quantize(z, codebook)
        straight = z + (quantized - z).detach()
        decoded = model.decoder(straight.reshape(BATCH, 4, 4, EMBEDDING_DIM).permute(0, 3, 1, 2))
        # Targets in -1..1 like the real decoder's output: positive inside the object, 0 on its edge.
        loss = F.mse_loss(decoded, batch * 2 - 1) + F.mse_loss(quantized, z.detach()) \
            + 0.25 * F.mse_loss(z, quantized.detach())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
        usage += torch.bincount(codes, minlength=NUM_CODES)
        with torch.no_grad():
            codebook.copy_(F.normalize(codebook, dim=1))
            if step % 25 == 24:
                dead = torch.nonzero(usage == 0).flatten()
                if len(dead):
                    codebook[dead] = z.detach()[torch.randint(0, len(z), (len(dead),), generator=order)]
                if step % 100 == 99:
                    log(f"step {step + 1}/{steps} loss {loss.item():.4f} codes used {(usage > 0).sum().item()}"
                        f" restarted {len(dead)}")
                usage.zero_()
    return {key: value.detach().numpy().astype(np.float32) for key, value in model.state_dict().items()}


# ---- the cache ----------------------------------------------------------------------------------------

def cache_path(seed: int = 0) -> Path:
    """Where the trained checkpoint of this script version and seed is kept."""
    digest = hashlib.sha256(Path(__file__).read_bytes()).hexdigest()[:16]
    root = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "paligemma-seg"
    return root / f"vae-fixture-{digest}-seed{seed}.npz"


def trained_vae_npz(seed: int = 0, log=print) -> Path:
    """The cached trained checkpoint, training it first if this machine has none."""
    path = cache_path(seed)
    if not path.is_file():
        start = time.perf_counter()
        weights = train(seed, log=log)
        path.parent.mkdir(parents=True, exist_ok=True)
        # Written aside and renamed: a concurrent reader never sees half a file.
        with tempfile.NamedTemporaryFile(dir=path.parent, suffix=".npz", delete=False) as tmp:
            np.savez(tmp, **weights)
        os.replace(tmp.name, path)
        log(f"trained the fixture VAE in {time.perf_counter() - start:.0f}s -> {path}")
    return path


def write_trained_vae(out: str | Path, seed: int = 0, log=print) -> Path:
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(trained_vae_npz(seed, log=log), out)
    return out


def median_iou(weights: dict[str, np.ndarray], seed: int = 12345, count: int = 256) -> float:
    """Median IoU of held-out 64×64 crops against their reconstruction (decoded > 0) by torch."""
    import torch

    model = build_vae()
    model.load_state_dict({k: torch.from_numpy(v) for k, v in weights.items()})
    masks = torch.from_numpy(training_masks(seed, count))[:, None]
    with torch.no_grad():
        z = model.encoder(masks * 2 - 1).permute(0, 2, 3, 1).reshape(-1, EMBEDDING_DIM)
        codes = torch.cdist(z, model._vq_vae._embedding).argmin(dim=1)  # the JAX encoder's rule
        decoded = model.decoder(model._vq_vae._embedding[codes].reshape(count, 4, 4, -1).permute(0, 3, 1, 2))
    truth, guess = masks > 0.5, decoded > 0
    iou = (truth & guess).sum(dim=(1, 2, 3)) / (truth | guess).sum(dim=(1, 2, 3)).clamp(min=1)
    return float(iou.median())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--evaluate", action="store_true", help="print the median IoU of held-out 64x64 crops")
    args = parser.parse_args(argv)
    print(write_trained_vae(args.out, args.seed))
    if args.evaluate:
        with np.load(args.out) as data:
            print(f"held-out median IoU at 64x64: {median_iou(dict(data)):.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
