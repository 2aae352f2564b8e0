#!/usr/bin/env python
"""Write offline fixtures: a random PaliGemma 2 with the real architecture and a vae-oid.npz trained on shapes.

Real weights cannot be downloaded on the build machines, so tests, the demo and the benchmarks run on
a model with the real classes (gemma2 text + siglip vision), the real special tokens (`<image>`,
`<loc0000>`..`<loc1023>`, `<seg000>`..`<seg127>`) and random weights:

    python scripts/make_tiny_model.py --out .fixtures              # DIR/paligemma, DIR/vae-oid.npz
    python scripts/make_tiny_model.py --out /tmp/m --size medium   # text 512x4, vision 256x4

The answers of such a model have the real shape and no meaning. The mask VAE is not random: it is
trained on synthetic shapes (scripts/train_vae_fixture.py, cached per machine), so decoded masks look
like masks and mask → text → mask round-trips; `--vae random` writes random weights instead.
"""

from __future__ import annotations

import argparse
import math
import re
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

# Words the toy tokenizer learns, so labels and prompts tokenize into a few pieces as with Gemma.
_CORPUS_WORDS = (
    "segment detect caption answer cat dog person man woman child car bus truck bicycle bird horse "
    "sheep cow elephant bear zebra giraffe tree sky road building grass water chair table bottle cup "
    "the a an on of in left right top bottom red blue green yellow black white big small ; , ."
).split()

_GEMMA2_2B = dict(hidden_size=2304, intermediate_size=9216, num_hidden_layers=26, num_attention_heads=8,
                  num_key_value_heads=4, head_dim=256)
_SIGLIP_SO400M = dict(hidden_size=1152, intermediate_size=4304, num_hidden_layers=27, num_attention_heads=16)

# Architecture sizes. `3b-224` / `3b-448` are the real paligemma2-3b-mix shapes (random weights,
# several GB): they let benchmarks measure the real compute on a GPU without the real checkpoint.
SIZES: dict[str, dict] = {
    "tiny": dict(
        text=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=16),
        vision=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2),
        image_size=224,
    ),
    "medium": dict(
        text=dict(hidden_size=512, intermediate_size=1024, num_hidden_layers=4, num_attention_heads=8,
                  num_key_value_heads=4, head_dim=64),
        vision=dict(hidden_size=256, intermediate_size=512, num_hidden_layers=4, num_attention_heads=4),
        image_size=224,
    ),
    # Gemma's real vocabulary size: the output layer is a large share of each decoding step.
    "3b-224": dict(text=_GEMMA2_2B, vision=_SIGLIP_SO400M, image_size=224, vocab_size=257216),
    "3b-448": dict(text=_GEMMA2_2B, vision=_SIGLIP_SO400M, image_size=448, vocab_size=257216),
}
# The tiny model reading 448 px pictures (1024 image tokens): tests of long prefixes.
SIZES["tiny-448"] = dict(SIZES["tiny"], image_size=448)


def build_tokenizer(word_vocab_size: int = 400):
    """A small byte-fallback BPE in Gemma's format with PaliGemma's extra tokens."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers
    from transformers import GemmaTokenizer

    specials = ["<pad>", "<eos>", "<bos>", "<unk>", "<mask>"]
    byte_tokens = [f"<0x{i:02X}>" for i in range(256)]
    bpe = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True))
    bpe.normalizer = normalizers.Replace(" ", "▁")
    bpe.pre_tokenizer = pre_tokenizers.Split("▁", behavior="merged_with_next")
    trainer = trainers.BpeTrainer(
        vocab_size=len(specials) + len(byte_tokens) + word_vocab_size,
        special_tokens=specials + byte_tokens,
        show_progress=False,
    )
    corpus = [" ".join(_CORPUS_WORDS[i:] + _CORPUS_WORDS[:i]) for i in range(len(_CORPUS_WORDS))]
    bpe.train_from_iterator(corpus * 4, trainer=trainer)
    model = bpe.model
    vocab = bpe.get_vocab()
    # The trained model keeps its merges only in its JSON form.
    import json

    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in
              json.loads(bpe.to_str())["model"]["merges"]]
    del model
    tokenizer = GemmaTokenizer(vocab=vocab, merges=merges, extra_special_tokens={"image_token": "<image>"})
    tokenizer.add_special_tokens({"additional_special_tokens": ["<image>"]})
    # <loc>/<seg> are plain added tokens in PaliGemma's vocabulary, not special ones.
    tokenizer.add_tokens([f"<loc{i:04d}>" for i in range(1024)] + [f"<seg{i:03d}>" for i in range(128)])
    tokenizer.padding_side = "left"
    return tokenizer


def build_paligemma(tokenizer, size: str = "tiny", seed: int = 0, device: str = "cpu"):
    """A PaliGemma of `size` with random weights, built on `device` (a GPU draws the 3B sizes in seconds)."""
    import torch
    from transformers import PaliGemmaConfig, PaliGemmaForConditionalGeneration

    spec = SIZES[size]
    vocab_size = max(spec.get("vocab_size", 0), len(tokenizer))
    text = dict(model_type="gemma2", vocab_size=vocab_size, max_position_embeddings=4096,
                pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                eos_token_id=tokenizer.eos_token_id, query_pre_attn_scalar=spec["text"]["head_dim"],
                sliding_window=4096, **spec["text"])
    vision = dict(model_type="siglip_vision_model", image_size=spec["image_size"], patch_size=14,
                  vision_use_head=False, **spec["vision"])
    config = PaliGemmaConfig(
        text_config=text, vision_config=vision, image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        vocab_size=vocab_size, projection_dim=spec["text"]["hidden_size"],
        hidden_size=spec["text"]["hidden_size"], tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    with torch.device(device):
        model = PaliGemmaForConditionalGeneration(config)
    # The default init (std 0.02) makes a random model emit one constant token; a wider init makes its
    # output depend on the image and the prompt, which the tests need.
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.dim() >= 2:
                fan_in = math.prod(param.shape[1:])
                param.normal_(0.0, 2.0 / math.sqrt(fan_in))
            elif name.endswith("bias"):
                param.zero_()
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    return model


def build_processor(tokenizer, image_size: int):
    from transformers import PaliGemmaProcessor
    from transformers.models.siglip import SiglipImageProcessorPil as SiglipImageProcessor

    image_processor = SiglipImageProcessor(
        size={"height": image_size, "width": image_size}, image_mean=[0.5] * 3, image_std=[0.5] * 3,
        resample=3, do_rescale=True, rescale_factor=1 / 255, do_normalize=True, do_convert_rgb=True,
    )
    image_processor.image_seq_length = (image_size // 14) ** 2
    return PaliGemmaProcessor(image_processor=image_processor, tokenizer=tokenizer)


def write_fixtures(out: Path, size: str = "tiny", seed: int = 0, vae: str = "trained", device: str = "cpu",
                   dtype: str = "float32") -> Path:
    """Write OUT/paligemma (save_pretrained model + processor) and OUT/vae-oid.npz; return OUT.

    `vae="trained"`: the VQ-VAE trained on synthetic shapes (scripts/train_vae_fixture.py, cached per
    machine, seed 0 whatever `seed` is, so every fixture shares one training); `"random"`: random weights.
    `device`: where the weights are drawn; `dtype`: how they are saved (bfloat16 halves a 3B fixture).
    """
    import torch

    from make_vae_fixture import write_vae_npz
    from train_vae_fixture import write_trained_vae

    out.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer()
    model = build_paligemma(tokenizer, size=size, seed=seed, device=device).to(getattr(torch, dtype))
    processor = build_processor(tokenizer, SIZES[size]["image_size"])
    model.save_pretrained(out / "paligemma")
    processor.save_pretrained(out / "paligemma")
    if vae == "trained":
        write_trained_vae(out / "vae-oid.npz", seed=0)
    else:
        write_vae_npz(out / "vae-oid.npz", seed=seed)
    return out


class TrainingBar:
    """The fixture VAE's training as a progress bar on stderr, fed the lines that
    `train_vae_fixture.train` logs (`step N/M loss ...` every 100 steps); other lines are printed."""

    STEP = re.compile(r"step (\d+)/(\d+) ")

    def __init__(self, total: int):
        from tqdm import tqdm

        self.bar = tqdm(total=total, unit="step", desc="training the mask VAE", mininterval=0)

    def __call__(self, line: str) -> None:
        if match := self.STEP.match(line):
            self.bar.update(int(match[1]) - self.bar.n)
            self.bar.set_postfix_str(line[match.end():], refresh=True)
        else:
            self.bar.write(line)

    def close(self) -> None:
        self.bar.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="output directory")
    parser.add_argument("--size", choices=sorted(SIZES), default="tiny")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--vae", choices=("trained", "random"), default="trained",
                        help="the mask VAE: trained on synthetic shapes (cached; default) or random weights")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    from train_vae_fixture import TRAIN_STEPS, cache_path, trained_vae_npz

    if args.vae == "trained" and not cache_path(0).is_file():
        # First, on its own: the one step of the first `make demo` that takes minutes.
        print(f"The mask VAE is trained once per machine (2 to 13 minutes on 2 cores), then kept in "
              f"{cache_path(0).parent}", flush=True)
        bar = TrainingBar(TRAIN_STEPS)
        try:
            trained_vae_npz(0, log=bar)
        finally:
            bar.close()
    write_fixtures(args.out, size=args.size, seed=args.seed, vae=args.vae)
    print(f"wrote {args.out}/paligemma and {args.out}/vae-oid.npz ({args.size}) "
          f"in {time.perf_counter() - start:.1f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
