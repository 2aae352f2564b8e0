#!/usr/bin/env python
"""Train a LoRA adapter of a PaliGemma model on a JSONL set of prefix -> suffix examples (PEFT + Trainer).

Each line of the JSONL file is `{"image": "<path relative to the file>", "prefix": "segment cat ; dog",
"suffix": "<loc..>x4<seg..>x16 cat ; ..."}`. `PaliGemmaProcessor(text=, images=, suffix=)` builds the
inputs, `token_type_ids` (the prefix attends both ways, as in serving) and `labels` with the image and
prefix masked, so the loss is on the suffix only. The Trainer shows progress and the loss; the output
directory is a PEFT adapter (`adapter_config.json`, `adapter_model.safetensors`) ready for
`import_models.py --adapter`.

    # a small synthetic set on the demo fixture, then a few steps
    python scripts/finetune.py --write-synthetic .fixtures/tiny/synthetic
    python scripts/finetune.py --base .fixtures/tiny/paligemma --data .fixtures/tiny/synthetic/train.jsonl \
        --out .fixtures/tiny/my-lora --steps 30 --learning-rate 5e-3
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import sys
import tempfile
from pathlib import Path

from PIL import Image, ImageDraw

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from segmentation.model.images import model_input  # noqa: E402

# The attention and MLP projections of both towers (Gemma 2 and SigLIP name theirs alike for q/k/v).
TARGET_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
HISTORY_FILE = "trainer_log.json"  # the Trainer's log history (loss per step); import ignores it


def read_examples(jsonl: Path) -> list[dict]:
    """The JSONL set's examples with `image` resolved against the file's folder."""
    examples = []
    for number, line in enumerate(jsonl.read_text().splitlines(), 1):
        if not line.strip():
            continue
        entry = json.loads(line)
        missing = {"image", "prefix", "suffix"} - entry.keys()
        if missing:
            raise SystemExit(f"{jsonl}:{number}: missing {sorted(missing)}")
        examples.append({**entry, "image": str(jsonl.parent / entry["image"])})
    if not examples:
        raise SystemExit(f"{jsonl} holds no examples")
    return examples


class Collator:
    """Turn examples into a training batch with the processor (labels mask everything but the suffix)."""

    def __init__(self, processor, image_size: int, dtype):
        self.processor = processor
        self.image_size = image_size
        self.dtype = dtype

    def __call__(self, examples: list[dict]) -> dict:
        # The same picture the server feeds the model (model_input), so training matches serving.
        pictures = [model_input(Image.open(e["image"]), self.image_size) for e in examples]
        batch = self.processor(
            text=["<image>" + e["prefix"] for e in examples], images=pictures,
            suffix=[e["suffix"] for e in examples], return_tensors="pt", padding="longest",
        )
        batch["pixel_values"] = batch["pixel_values"].to(self.dtype)
        return batch


def finetune(base: Path, data: Path, out: Path, *, steps: int, learning_rate: float, batch_size: int,
             rank: int, seed: int) -> list[dict]:
    """Train and save the adapter in `out`; return the Trainer's log history (one entry per logged step)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import PaliGemmaForConditionalGeneration, PaliGemmaProcessor, Trainer, TrainingArguments

    processor = PaliGemmaProcessor.from_pretrained(base, local_files_only=True)
    dtype = torch.bfloat16 if torch.cuda.is_available() else torch.float32
    model = PaliGemmaForConditionalGeneration.from_pretrained(base, dtype=dtype, local_files_only=True)
    config = LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.0, target_modules=TARGET_MODULES)
    model = get_peft_model(model, config)
    model.print_trainable_parameters()
    checkpoints = tempfile.mkdtemp(prefix="finetune-")  # save_strategy="no": the Trainer only needs a folder
    args = TrainingArguments(
        output_dir=checkpoints, max_steps=steps, per_device_train_batch_size=batch_size,
        learning_rate=learning_rate, logging_steps=1, save_strategy="no", report_to=[], seed=seed,
        remove_unused_columns=False,  # the collator needs the raw examples
        disable_tqdm=False, bf16=dtype == torch.bfloat16,
    )
    trainer = Trainer(model=model, args=args, train_dataset=read_examples(data),
                      data_collator=Collator(processor, model.config.vision_config.image_size, dtype))
    trainer.train()
    shutil.rmtree(checkpoints, ignore_errors=True)
    model.save_pretrained(out)
    (out / HISTORY_FILE).write_text(json.dumps(trainer.state.log_history, indent=1))
    return trainer.state.log_history


def write_synthetic_set(out: Path, count: int = 8, seed: int = 0) -> Path:
    """A JSONL set of `count` pictures with one or two coloured boxes each; returns the JSONL path.

    Targets follow PaliGemma's format: y1 x1 y2 x2 binned by round(v * 1023), 16 mask codes (random:
    the set checks training runs, not what it learns), then the label.
    """
    rng = random.Random(seed)
    colours = {"cat": (220, 40, 40), "dog": (40, 40, 220)}
    out.mkdir(parents=True, exist_ok=True)
    lines = []
    for index in range(count):
        picture = Image.new("RGB", (224, 224), (128, 128, 128))
        draw = ImageDraw.Draw(picture)
        labels = rng.sample(sorted(colours), rng.choice([1, 2]))
        objects = []
        for label in labels:
            y1, x1 = rng.uniform(0, 0.5), rng.uniform(0, 0.5)
            y2, x2 = y1 + rng.uniform(0.2, 0.5), x1 + rng.uniform(0.2, 0.5)
            draw.rectangle([x1 * 224, y1 * 224, x2 * 224, y2 * 224], fill=colours[label])
            locs = "".join(f"<loc{round(v * 1023):04d}>" for v in (y1, x1, y2, x2))
            segs = "".join(f"<seg{rng.randrange(128):03d}>" for _ in range(16))
            objects.append(f"{locs}{segs} {label}")
        name = f"{index:03d}.png"
        picture.save(out / name)
        lines.append(json.dumps({"image": name, "prefix": "segment " + " ; ".join(labels),
                                 "suffix": " ; ".join(objects)}))
    jsonl = out / "train.jsonl"
    jsonl.write_text("\n".join(lines) + "\n")
    return jsonl


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", type=Path, help="PaliGemma directory (save_pretrained layout) to adapt")
    parser.add_argument("--data", type=Path, help="JSONL training set (image, prefix, suffix per line)")
    parser.add_argument("--out", type=Path, help="adapter directory to write")
    parser.add_argument("--steps", type=int, default=100, help="optimizer steps")
    parser.add_argument("--learning-rate", type=float, default=2e-4)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--rank", type=int, default=8, help="LoRA rank")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--write-synthetic", type=Path, metavar="DIR",
                        help="write a small synthetic JSONL set (DIR/train.jsonl) and exit")
    parser.add_argument("--examples", type=int, default=8, help="examples in the synthetic set")
    args = parser.parse_args(argv)
    if args.write_synthetic:
        print(write_synthetic_set(args.write_synthetic, args.examples, args.seed))
        return 0
    if not (args.base and args.data and args.out):
        parser.error("give --base, --data and --out (or --write-synthetic DIR)")
    history = finetune(args.base, args.data, args.out, steps=args.steps, learning_rate=args.learning_rate,
                       batch_size=args.batch_size, rank=args.rank, seed=args.seed)
    losses = [entry["loss"] for entry in history if "loss" in entry]
    print(f"loss {losses[0]:.4f} -> {losses[-1]:.4f} over {len(losses)} steps; adapter written to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
