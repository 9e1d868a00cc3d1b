"""The trainer unchanged under `accelerate launch` with two CPU processes (DDP over gloo).

Both ranks must end with identical adapter weights, equal to those of one process that sees
the same global batches (batch size 2 x the per-process one): accelerate gives rank k the
batches k, k+2, ... of the loader's shuffled order, so a global step covers the same examples
as one batch of twice the size, as long as both runs shuffle in the same order: the training
loader has its own generator seeded by `config.seed` (`splice.train.data.train_loader`), which
accelerate shares across ranks. Without it the shuffle seed comes from the global random stream
at a point that differs between one process and several, and the losses part from step 3.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import accelerate
import pytest
import torch
from ddp_worker import train_and_dump
from helpers import save_tiny_bert
from packaging.version import Version
from safetensors.torch import load_file
from train_helpers import write_jsonl

from splice.train import TrainConfig

WORKER = Path(__file__).with_name("ddp_worker.py")
PER_PROCESS_BATCH = 4

pytestmark = [
    pytest.mark.skipif(not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
                       reason="torch.distributed with gloo is not available"),
    # Before 1.7, `--main_process_port 0` reaches torchrun as port 0 and the workers wait forever.
    pytest.mark.skipif(Version(accelerate.__version__) < Version("1.7"),
                       reason="accelerate < 1.7 does not pick a free port for --main_process_port 0"),
]


@pytest.fixture(scope="module")
def tiny_classifier_dir(tmp_path_factory) -> Path:
    """The tiny BERT without dropout, so that runs can be compared."""
    return save_tiny_bert(tmp_path_factory.mktemp("tiny-bert-classifier"), dropout=0.0)


def rows(n: int, seed: int, most_words: int = 3) -> list[dict]:
    """Three-word texts by default, so that a per-process batch pads to the length of the global
    batch: padding that differs only changes the last bits of the sums, but Adam amplifies them.
    Length grouping needs lengths to group (1 to `most_words` words)."""
    rng = random.Random(seed)
    words = {1: ["good", "great", "fine", "superb"], 0: ["bad", "awful", "poor", "dull"]}
    out = []
    for _ in range(n):
        label = rng.randint(0, 1)
        count = 3 if most_words == 3 else rng.randint(1, most_words)
        out.append({"text": " ".join(rng.choice(words[label]) for _ in range(count)), "label": label})
    return out


def flat(metrics: dict) -> dict[str, float]:
    """{"after": {"validation": {"loss": x}}} -> {"after/validation/loss": x}."""
    return {f"{when}/{split}/{key}": value for when, splits in metrics.items()
            for split, values in splits.items() for key, value in values.items()}


@pytest.mark.parametrize("grouped", [False, True], ids=["shuffled", "length-grouped"])
def test_two_processes_match_one_process_with_the_same_global_batch(tiny_classifier_dir, tmp_path, grouped):
    """Length-grouped, a global step's rows are the same too: mega-batches count global steps
    (`batching.LengthGroupedSampler`), and accelerate deals the two halves of each to the ranks."""
    most_words = 12 if grouped else 3
    train = write_jsonl(tmp_path / "train.jsonl", rows(64, 1, most_words))
    val = write_jsonl(tmp_path / "val.jsonl", rows(20, 2, most_words))  # 20 rows: uneven shards, deduplicated by gather
    # Four epochs of 8 global steps (each epoch's reshuffle must agree too), evaluated every 8:
    # accuracy reaches 1.0 at step 24 and ties at 32, so the weights compared are a trained
    # snapshot that `run` restored at the end.
    ddp = TrainConfig(model=str(tiny_classifier_dir), data=str(train), validation=str(val),
                      batch_size=PER_PROCESS_BATCH, epochs=4, eval_every=8, lr=3e-2, head_lr=0.1,
                      warmup_ratio=0.1, output_dir=str(tmp_path / "ddp-run"), group_by_length=grouped)
    config_file = tmp_path / "ddp.yaml"
    ddp.to_yaml(config_file)
    # `--cpu` alone starts one process (several need mpirun); `--multi_gpu` starts them through
    # torchrun, and ACCELERATE_USE_CPU makes accelerate run them on the CPU over gloo, also on a
    # machine with GPUs. Port 0: accelerate picks a free one.
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false"}
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
               "--main_process_port", "0", str(WORKER), str(config_file), str(tmp_path / "ddp")]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]

    single = TrainConfig.from_dict(ddp.to_dict(), batch_size=2 * PER_PROCESS_BATCH,
                                   output_dir=str(tmp_path / "single-run"))
    train_and_dump(single, tmp_path / "single")

    rank0, rank1 = (load_file(tmp_path / "ddp" / f"rank{r}.safetensors") for r in (0, 1))
    reference = load_file(tmp_path / "single" / "rank0.safetensors")
    assert rank0.keys() == rank1.keys() == reference.keys()
    assert any(".lora_B" in k for k in reference) and "classifier.weight" in reference
    for name, tensor in rank0.items():
        assert torch.equal(tensor, rank1[name]), f"{name} differs between ranks"
        # Not bit-exact: DDP averages two 4-example means, one process takes one 8-example mean.
        torch.testing.assert_close(tensor, reference[name], atol=2e-6, rtol=1e-5, msg=lambda m, n=name: f"{n}: {m}")

    summaries = [json.loads((tmp_path / folder / "rank0.json").read_text()) for folder in ("ddp", "single")]
    ranks = json.loads((tmp_path / "ddp" / "rank1.json").read_text())
    assert ranks == summaries[0]  # every rank reports the same (reduced, gathered) numbers
    ddp_summary, single_summary = summaries
    assert len(ddp_summary["losses"]) == len(single_summary["losses"]) == 32
    assert ddp_summary["lrs"] == pytest.approx(single_summary["lrs"], rel=1e-12)
    assert ddp_summary["losses"] == pytest.approx(single_summary["losses"], rel=1e-5)
    assert ddp_summary["best_step"] == single_summary["best_step"]
    assert 0 < ddp_summary["best_step"] < 32  # a trained snapshot, restored after the last step
    assert flat(ddp_summary["metrics"]) == pytest.approx(flat(single_summary["metrics"]), rel=1e-5)
    # The main process wrote the adapter and the report.
    assert (tmp_path / "ddp-run" / "adapter" / "adapter_model.safetensors").is_file()
    assert (tmp_path / "ddp-run" / "metrics.json").is_file()
