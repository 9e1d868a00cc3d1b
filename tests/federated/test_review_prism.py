"""Review of federated task sequences and PRISM (`splice.federated.sequence`,
`splice.federated.methods.prism`, `FederatedConfig.tasks`): failing tests that show defects.
Each test says what is wrong and what the correct behaviour is. No Flower simulation runs here:
every defect is shown on the function the run calls."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoTokenizer, BertForSequenceClassification

import splice
from splice.continual.projection import sketch
from splice.continual.sequence import TaskSpec
from splice.core.errors import ConfigError, SpliceError
from splice.federated import FederatedConfig
from splice.federated.methods.prism import merge_sketches, residual_covariance, routed_covariances
from splice.federated.sequence import TaskSequence

THREE = {"positive": "pos", "negative": "other", "neutral": "other"}


def client_answer(inputs: torch.Tensor, basis: torch.Tensor | None, threshold: float) -> dict[str, torch.Tensor]:
    """What `PRISM.answer_query` sends for one layer and expert, from the rows `inputs` [n, d]."""
    covariance = inputs.T @ inputs
    residual = residual_covariance(covariance, basis)
    return {"sketch/layer/0": sketch(residual, energy=threshold, max_rank=32),
            "energy/layer/0": torch.tensor([float(covariance.trace()), float(residual.trace())])}


# DEFECT (prism.py merge_sketches / answer_query, via projection.sketch and extend_basis): with
# `threshold: 1.0` (accepted by PRISM.check, used by PRISM's own tests) a task whose inputs the
# basis already holds still grows the basis. The client's residual off the float32 basis is
# round-off (trace ~1e-13 of the total), `sketch(energy=1.0)` sends its noise eigenvectors, and the
# server's `held < 1.0 * total` appends them. Here two tasks on the same 5-dim input subspace of
# R^16 end with a full 16-column basis: every A_e of the next block is projected to 0 and the
# router is frozen (the expert can never learn again), with nothing gained in protection.
# Correct: the basis stays at 5 columns (round-off residual energy counts as zero; noise
# eigenvalues, e.g. below 1e-10 of the trace, are not sketched).
def test_threshold_one_does_not_fill_the_basis_with_round_off_directions():
    d, k = 16, 5
    generator = torch.Generator().manual_seed(0)
    subspace = torch.linalg.qr(torch.randn(d, k, generator=generator, dtype=torch.float64))[0]
    rows = [torch.randn(50, k, generator=generator, dtype=torch.float64) @ subspace.T for _ in range(2)]
    first = merge_sketches({}, [client_answer(x, None, 1.0) for x in rows], 1.0)
    assert first["layer"][0].shape == (d, k)  # task one: exactly its inputs' span
    basis = first["layer"][0]
    second = merge_sketches(first, [client_answer(x, basis, 1.0) for x in rows], 1.0)  # the same inputs again
    assert second["layer"][0].shape == (d, k)


# DEFECT (prism.py routed_covariances, the `record` hook): the hook assumes every adapted layer's
# input is [rows, seq, d] and multiplies the gates by the batch's attention mask [rows, seq, 1].
# A Linear with a 2-D input breaks it: BERT's `bert.pooler.dense` (CLS token only, [rows, d]),
# which MoELoRA's `targets: all-linear` selects. The query round after task 1 then fails at every
# client, and `PRISM.end_task` aborts the whole run ("clients gave no sketch"); where rows == seq
# the shapes broadcast and the covariance is silently wrong. The core already handles this
# (`BatchInputs.mask_for` returns None for a non-[rows, seq] input). Correct: a 2-D input (or one
# whose leading dims are not the mask's) counts every row, as `mask_for` does.
def test_query_covariances_work_with_a_two_dimensional_layer_input(tiny_bert, make_config):
    model = BertForSequenceClassification.from_pretrained(tiny_bert, num_labels=3)
    tokenizer = AutoTokenizer.from_pretrained(tiny_bert)
    splice.attach(model, splice.MoELoRA(experts=2, top_k=1, r=4, targets="all-linear", aux_loss=0.0), "global")
    rows = [{"text": "good bad great " * (1 + i % 3), "label": i % 3} for i in range(6)]
    covariances = routed_covariances(model, tokenizer, rows, make_config().train_config())
    assert "bert.pooler.dense" in covariances
    assert all(c.trace() >= 0 for c in covariances["bert.pooler.dense"])


# DEFECT (sequence.py TaskSequence.__init__): a task that shares an earlier task's head
# (`head: one`) is never checked to have that task's labels. `splice.continual.harness` refuses
# it (`_check_same_labels`: "shares the head of ... but its labels ... are not ..."), and TaskSpec
# documents "its labels must be the same"; the federated sequence silently trains task two's
# 2 labels (other, pos) on task one's 3-class head (index 0/1 = negative/neutral), and a task with
# more labels than the head has classes fails in every client with an index error deep in the
# loss (recorded as failures, the run goes on). Correct: a ConfigError naming both label lists
# when the sequence is built.
def test_a_task_sharing_a_head_must_have_its_labels(tiny_bert, word_file, tmp_path):
    config = FederatedConfig(
        model=str(tiny_bert), clients=2, rounds=1, local_steps=1, adapter={"method": "lora", "r": 4},
        tasks=[{"name": "one", "data": str(word_file)},
               {"name": "two", "data": str(word_file), "labels": THREE, "head": "one"}],
        partition={"scheme": "iid"}, output_dir=str(tmp_path / "run"))
    model = BertForSequenceClassification.from_pretrained(tiny_bert, num_labels=3)
    with pytest.raises((ConfigError, SpliceError), match="labels"):
        TaskSequence(config, model)


# DEFECT (config.py FederatedConfig._check_tasks): the per-task keys a federated task cannot take
# (max_steps, epochs, lr, ...) are refused only when a task is a mapping; a TaskSpec object (the
# Python API, `SequenceConfig`'s own type) skips the check, so its budget is accepted, silently
# ignored by the run, and dropped by `to_dict` (the config no longer reads back equal).
# Correct: the same ConfigError as for a mapping ("a federated task takes name, data, labels and
# head").
def test_a_task_spec_object_with_a_budget_is_refused(word_file, tiny_bert, tmp_path):
    with pytest.raises(ConfigError, match="per-task budget|takes name, data"):
        FederatedConfig(model=str(tiny_bert), clients=2, rounds=1, local_steps=1,
                        adapter={"method": "lora", "r": 4}, partition={"scheme": "iid"},
                        tasks=[TaskSpec(name="one", data=str(word_file), lr=0.5),
                               TaskSpec(name="two", data=str(word_file), max_steps=100)],
                        output_dir=str(tmp_path / "run"))
