"""PRISM on Flower (`splice.federated.methods.prism`): a MoELoRA block per task, updates
projected off per-expert input bases that all clients share.

Spec test 2 end to end: three tasks on the tiny BERT with the energy threshold at 1 (the bases
hold every input of the finished tasks); the first task's outputs, recomputed from the saved
blocks and heads, are the same whether the later tasks' blocks are on or off, while those
blocks did learn their own tasks. The AdamW reason for re-projecting after each step is shown
on a bare MoELoRA adapter."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoTokenizer, BertForSequenceClassification

import splice
from splice.continual import heads as task_heads
from splice.continual.projection import project_out
from splice.core.errors import ConfigError
from splice.federated import FederatedConfig, run_federated
from splice.federated.methods.prism import PRISM, Reprojection, adapters_of, block_name

ONE = {"positive": ["good", "great"], "negative": ["bad", "awful"]}  # one word per row: few distinct inputs


def write_rows(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def task_files(tmp_path_factory, word_file) -> dict[str, Path]:
    rng = random.Random(1)
    folder = tmp_path_factory.mktemp("prism-data")
    one = [{"text": rng.choice(ONE[label]), "label": label} for label in rng.choices(sorted(ONE), k=120)]
    return {"one": write_rows(folder / "one.jsonl", one), "words": word_file}


def prism_config(tiny_bert: Path, files: dict[str, Path], folder: Path, **overrides) -> FederatedConfig:
    settings = dict(
        model=str(tiny_bert),
        tasks=[{"name": "one", "data": str(files["one"])},
               {"name": "two", "data": str(files["words"])},
               {"name": "three", "data": str(files["words"]),
                "labels": {"positive": "pos", "negative": "other", "neutral": "other"}}],
        method="prism", options={"threshold": 1.0, "sketch_rank": 32, "basis_rows": 200},
        adapter={"method": "moelora", "experts": 2, "top_k": 1, "r": 4, "alpha": 8, "aux_loss": 0.0},
        clients=2, rounds=2, local_steps=4, eval_examples=24,
        train={"batch_size": 8, "max_length": 8, "lr": 2e-2, "group_by_length": False},
        partition={"scheme": "iid"}, output_dir=str(folder / "prism"))
    settings.update(overrides)
    return FederatedConfig(**settings)


@pytest.fixture(scope="module")
def prism_run(tiny_bert, task_files, tmp_path_factory):
    config = prism_config(tiny_bert, task_files, tmp_path_factory.mktemp("prism-run"))
    return config, run_federated(config)


def saved_model(tiny_bert: Path, run_dir: Path, config: FederatedConfig):
    """The run's final model rebuilt from its files: every block, the global block, the heads."""
    model = BertForSequenceClassification.from_pretrained(tiny_bert, num_labels=2).eval()
    heads, _ = task_heads.install(model)
    tensors = load_file(run_dir / "task-heads.safetensors")
    for spec in config.tasks:
        heads.add(spec.name, tensors[f"classifier.heads.{spec.name}.weight"].shape[0])
    result = model.load_state_dict(tensors, strict=False)  # the heads only: the base is the folder's
    assert not result.unexpected_keys and not set(tensors) & set(result.missing_keys)
    blocks = [block_name(t) for t in range(len(config.tasks) - 1)]
    for name in blocks:
        splice.load(model, run_dir / "blocks" / name, name)
    splice.load(model, run_dir / "global-adapter", "global")
    return model, heads, blocks


def logits(model, heads, task: str, texts: list[str], tokenizer) -> torch.Tensor:
    task_heads.select(model, heads, task)
    batch = tokenizer(texts, return_tensors="pt", padding=True)
    with torch.no_grad():
        return model(**batch).logits


def test_prism_keeps_the_first_tasks_outputs_while_later_blocks_learn(prism_run, tiny_bert, task_files):
    config, result = prism_run
    assert not any(r["failures"] for r in result.rounds)  # every client trained every round
    run_dir = Path(config.output_dir)
    model, heads, blocks = saved_model(tiny_bert, run_dir, config)
    tokenizer = AutoTokenizer.from_pretrained(tiny_bert)
    first = [w for words in ONE.values() for w in words]
    splice.activate(model, [blocks[0]])
    before = logits(model, heads, "one", first, tokenizer)  # what task one ended with
    splice.activate(model, [*blocks, "global"])
    after = logits(model, heads, "one", first, tokenizer)
    kept = (after - before).abs().max()
    assert kept < 1e-4

    # the later blocks are not idle: they change the outputs of their own task's rows
    rows = [json.loads(line)["text"] for line in Path(task_files["words"]).read_text().splitlines()[:16]]
    splice.activate(model, [blocks[0]])
    without = logits(model, heads, "two", rows, tokenizer)
    splice.activate(model, blocks[:2])
    with_two = logits(model, heads, "two", rows, tokenizer)
    assert (with_two - without).abs().max() > 100 * kept

    matrix = result.results["accuracy_matrix"]
    assert len(matrix) == 3 and matrix[2][0] == pytest.approx(matrix[0][0], abs=1e-6)
    assert [r["round"] for r in result.rounds] == list(range(7)) and result.rounds[3]["task"] == "two"


def test_prism_bases_are_shared_orthonormal_and_the_fedavg_mean_stays_off_them(prism_run):
    config, result = prism_run
    rounds = result.rounds
    later = [r for r in rounds if r.get("task") in ("two", "three")]
    assert later and all(r["aggregation"]["prism_orthogonality_error"] < 1e-5 for r in later)
    assert all(r["aggregation"]["prism_basis_mean_dim"] > 0 for r in later)
    # the bases travel with training messages only; a query round asked every client after tasks 1 and 2
    queries = [r for r in rounds if "query" in r["bytes_by_type"]]
    assert [(r["task"], r["round"]) for r in queries] == [("one", 2), ("two", 4)]
    assert all(len(r["bytes_by_type"]["query"]["uplink"]) == config.clients for r in queries)
    def down(record: dict, kind: str) -> int:
        return record["bytes_by_type"][kind]["downlink"]["0"]

    first, task_start, task_end = rounds[1], later[0], later[1]
    # a task's first message to a node carries the bases and the frozen blocks ...
    assert down(task_start, "train") > down(first, "train") + 1000
    # ... later ones the trained block and head only (a flag and the round's keys aside)
    trained = down(task_end, "train")
    assert trained < down(first, "train") < down(task_start, "train")
    assert abs(down(task_end, "evaluate") - trained) < 100 and abs(down(task_start, "evaluate") - trained) < 100


def test_prism_saves_each_tasks_block_the_heads_and_the_report(prism_run):
    config, result = prism_run
    run_dir = Path(config.output_dir)
    assert sorted(p.name for p in (run_dir / "blocks").iterdir()) == ["prism-0", "prism-1"]
    bases = load_file(run_dir / "prism-bases.safetensors")
    assert bases and all(b.shape[0] == 32 and torch.allclose(b.T @ b, torch.eye(b.shape[1]), atol=1e-5)
                         for b in bases.values())
    assert set(load_file(run_dir / "task-heads.safetensors")) == {
        f"classifier.heads.{t}.{p}" for t in ("one", "two", "three") for p in ("weight", "bias")}
    table = (run_dir / "report" / "results.md").read_text()
    assert "Global accuracy after each task" in table and "backward transfer" in table
    assert "continual" in result.final
    assert all(result.paths[key].exists() for key in ("forgetting", "task_heads", "blocks", "curves"))


def test_adamw_takes_a_projected_gradient_off_the_subspace_and_the_reprojection_brings_it_back():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 16))
    splice.attach(model, splice.MoELoRA(experts=2, top_k=1, r=4, targets=["0"], aux_loss=0.0), "global")
    adapter = adapters_of(model, "global")["0"]
    basis = torch.linalg.qr(torch.randn(16, 5))[0]
    method = PRISM.__new__(PRISM)  # the projection state alone; no run config needed
    method.set_bases({"0": [basis, basis]})
    with torch.no_grad():
        adapter.lora_A.copy_(method.project_A("0", adapter, adapter.lora_A))
        adapter.lora_B.normal_(std=0.1)
    handle = adapter.lora_A.register_hook(lambda g: method.project_A("0", adapter, g))
    optimizer = torch.optim.AdamW([adapter.lora_A], lr=1e-2)
    x = torch.randn(32, 16)
    for _ in range(3):
        optimizer.zero_grad()
        model(x).pow(2).mean().backward()
        grad = adapter.lora_A.grad
        assert (grad @ basis).abs().max() < 1e-6 * grad.abs().max()  # the gradient is projected ...
        optimizer.step()
    assert (adapter.lora_A.detach() @ basis).abs().max() > 1e-4  # ... AdamW's step is not
    Reprojection(method, model).on_step_end(None, {})
    assert (adapter.lora_A.detach() @ basis).abs().max() < 1e-6
    handle.remove()
    assert torch.allclose(project_out(adapter.lora_A.detach()[:2], basis), adapter.lora_A.detach()[:2], atol=1e-6)


@pytest.mark.parametrize("changes, message", [
    ({"tasks": None, "data": "rotten_tomatoes"}, "tasks"),
    ({"adapter": {"method": "lora", "r": 4}}, "MoELoRA"),
    ({"adapter": {"method": "moelora", "experts": 2, "top_k": 1, "r": 4, "init": "goat"}}, "init"),
    ({"options": {"threshold": 0.0}}, "threshold"),
    ({"options": {"sketch_rank": 0}}, "sketch_rank"),
    ({"options": {"bases": "mine"}}, "bases"),
    ({"options": {"treshold": 0.9}}, "threshold"),
])
def test_prism_refuses_what_it_cannot_run(tiny_bert, task_files, tmp_path, changes, message):
    with pytest.raises(ConfigError, match=message):
        prism_config(tiny_bert, task_files, tmp_path, **changes)


def test_the_cli_tables_show_each_rounds_task_and_the_accuracy_matrix(prism_run):
    from rich.console import Console

    from splice.cli.federate_cmd import matrix_table, rounds_table

    _, result = prism_run
    console = Console(record=True, width=160)
    console.print(rounds_table(result))
    console.print(matrix_table(result))
    text = " ".join(console.export_text().split())  # captions wrap to the table's width
    assert "one -> two -> three" in text and "3 (two)" in text
    assert "global accuracy after each task" in text and "backward transfer" in text
    scores = result.final["continual"]
    assert f"{scores['average_accuracy']:.3f}" in text
