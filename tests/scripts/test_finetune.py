"""scripts/finetune.py: a few real training steps of a LoRA adapter on the tiny model lower the loss and
write an adapter directory that passes the import checks (tests/service/test_serve_adapters.py serves it)."""

from __future__ import annotations

import json

from finetune import HISTORY_FILE, read_examples, write_synthetic_set

from segmentation.model.adapters import check_lora_dir


def test_finetuning_lowers_the_loss_and_writes_an_adapter(finetuned_adapter, tiny_fixtures):
    history = json.loads((finetuned_adapter / HISTORY_FILE).read_text())
    losses = [entry["loss"] for entry in history if "loss" in entry]
    assert len(losses) == 12
    assert sum(losses[-3:]) / 3 < 0.8 * sum(losses[:3]) / 3, losses
    config = check_lora_dir(finetuned_adapter, tiny_fixtures / "paligemma")
    assert "q_proj" in config.target_modules
    log = (finetuned_adapter.parent / "finetune.log").read_text()
    assert "12/12" in log and "loss" in log  # the Trainer's progress bar and loss lines


def test_the_synthetic_set_has_the_data_tools_layout(tmp_path):
    jsonl = write_synthetic_set(tmp_path / "set", count=3, seed=1)
    examples = read_examples(jsonl)
    assert len(examples) == 3
    for example in examples:
        assert example["prefix"].startswith("segment ")
        classes = example["prefix"].removeprefix("segment ").split(" ; ")
        objects = example["suffix"].split(" ; ")
        assert len(objects) == len(classes)
        for obj, label in zip(objects, classes):
            assert obj.count("<loc") == 4 and obj.count("<seg") == 16 and obj.endswith(" " + label)
        assert (tmp_path / "set" / json.loads(jsonl.read_text().splitlines()[0])["image"]).is_file()
