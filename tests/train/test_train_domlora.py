"""DomLoRA through the trainer: the probe comes from the training data, the saved file is a LoRA."""

from __future__ import annotations

import json

from rich.console import Console

from splice.train import TrainConfig, run


def test_domlora_in_the_trainer_probes_training_batches(tiny_classification, tmp_path):
    config = TrainConfig.from_dict(tiny_classification.to_dict(), adapter={"method": "domlora", "r": 2, "top_k": 2},
                                   max_steps=2, output_dir=str(tmp_path / "run"))
    result = run(config, console=Console(quiet=True))
    saved = json.loads((result.paths["adapter"] / "adapter_config.json").read_text())
    assert saved["peft_type"] == "LORA" and len(saved["target_modules"]) == 2 and saved["r"] == 2
