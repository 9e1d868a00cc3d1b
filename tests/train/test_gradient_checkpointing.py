"""Gradient checkpointing on a frozen base: the adapters get the gradients they get without it.

Reentrant checkpointing connects a recomputed block to the graph only through its inputs, and
a frozen base gives the first block inputs that do not require grad. Before `splice.attach`
handled it, a tiny BERT with a trained head trained the head alone (no gradient reached the
adapters, silently) and a tiny Llama failed in backward with "element 0 of tensors does not
require grad and does not have a grad_fn". transformers 5 works around it itself inside
`gradient_checkpointing_enable()`; transformers 4 did not, which the "reentrant, no hook of
transformers" case reproduces by removing transformers' hook.
"""

from __future__ import annotations

import copy

import pytest
import torch
import yaml
from helpers import randomize
from rich.console import Console
from torch import nn
from transformers import BertConfig, BertForSequenceClassification, LlamaConfig, LlamaForCausalLM
from typer.testing import CliRunner

import splice
from splice.train import TrainConfig, run
from splice.train.loop import _enable_gradient_checkpointing

pytestmark = pytest.mark.filterwarnings("ignore:`gradient_checkpointing_enable` is deprecated:FutureWarning")

VOCAB = 97
IDS = torch.randint(1, VOCAB, (2, 11), generator=torch.Generator().manual_seed(1))


def tiny(arch: str) -> nn.Module:
    """Tiny random models without dropout, so that runs with and without checkpointing compare."""
    torch.manual_seed(0)
    if arch == "bert":
        config = BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                            intermediate_size=40, max_position_embeddings=64, num_labels=2,
                            hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
        return BertForSequenceClassification(config)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=40, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return LlamaForCausalLM(config)


def adapted(arch: str) -> nn.Module:
    model = tiny(arch)
    train_also = ["classifier"] if arch == "bert" else []
    splice.attach(model, splice.LoRA(r=4, alpha=8, targets="all-linear", train_also=train_also))
    randomize(model)  # B = 0 at init would leave every lora_A gradient at zero
    return model


def drop_transformers_hook(model: nn.Module) -> None:
    """Remove the input-grad hook transformers 5 installs (transformers 4 installs none here)."""
    if hasattr(model, "_require_grads_hook"):
        model.disable_input_require_grads()


def enable(model: nn.Module, mode: str) -> None:
    if mode == "default":
        model.gradient_checkpointing_enable()
    elif mode == "reentrant-no-transformers-hook":  # what transformers 4 does for a non-PEFT model
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
        drop_transformers_hook(model)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": mode == "reentrant"})


def train_step(model: nn.Module, arch: str) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Loss and gradients of one training step; checks that the frozen base got no gradient."""
    model.train()
    labels = torch.tensor([0, 1]) if arch == "bert" else IDS
    loss = model(input_ids=IDS, labels=labels).loss
    loss.backward()
    trainable = splice.trainable_parameters(model)
    frozen_with_grad = [n for n, p in model.named_parameters() if n not in trainable and p.grad is not None]
    assert frozen_with_grad == []
    return loss.detach(), {n: p.grad for n, p in trainable.items()}


@pytest.mark.parametrize("mode", ["default", "reentrant", "non-reentrant", "reentrant-no-transformers-hook"])
@pytest.mark.parametrize("arch", ["bert", "llama"])
def test_checkpointing_gives_the_gradients_of_a_plain_backward(arch, mode):
    loss, expected = train_step(adapted(arch), arch)
    model = adapted(arch)
    enable(model, mode)
    checkpointed_loss, grads = train_step(model, arch)
    torch.testing.assert_close(checkpointed_loss, loss, atol=1e-6, rtol=0)
    assert grads.keys() == expected.keys() and len(grads) > 10
    for name, grad in grads.items():
        assert grad is not None, f"{name} got no gradient"
        assert expected[name].abs().max() > 0
        torch.testing.assert_close(grad, expected[name], atol=1e-6, rtol=0, msg=lambda m, n=name: f"{n}: {m}")


def embedding_output_requires_grad(model: nn.Module, **kwargs) -> bool:
    seen = []
    handle = model.get_input_embeddings().register_forward_hook(lambda m, a, out: seen.append(out.requires_grad))
    try:
        model(input_ids=IDS, **kwargs)
    finally:
        handle.remove()
    return seen[-1]


@pytest.mark.filterwarnings("ignore:None of the inputs have requires_grad:UserWarning")  # the no_grad case
def test_embeddings_require_grad_only_while_training_with_checkpointing():
    model = adapted("llama")
    drop_transformers_hook(model)
    model.train()
    assert not embedding_output_requires_grad(model)  # no extra backward work without checkpointing
    enable(model, "reentrant-no-transformers-hook")
    assert embedding_output_requires_grad(model)
    with torch.no_grad():
        assert not embedding_output_requires_grad(model)
    model.eval()
    assert not embedding_output_requires_grad(model)


def hooked(model: nn.Module) -> bool:
    return any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())


def test_detach_and_unload_remove_the_hooks_and_outputs_do_not_change():
    plain = tiny("llama").eval()
    with torch.no_grad():
        base = plain(input_ids=IDS).logits
    model = copy.deepcopy(plain)
    splice.attach(model, splice.LoRA(r=2, targets=["q_proj"]), "a")
    splice.attach(model, splice.LoRA(r=2, targets=["v_proj"]), "b")
    with torch.no_grad():
        assert torch.equal(model(input_ids=IDS).logits, base)  # B = 0: the hooks change no value
    splice.detach(model, "a")
    assert hooked(model)  # "b" is still attached
    splice.detach(model, "b")
    assert not hooked(model)

    splice.attach(model, splice.LoRA(r=2, targets=["q_proj"]))
    clone = copy.deepcopy(model)  # the copy has hooks of its own
    splice.unload(model)
    assert not hooked(model) and hooked(clone)
    enable(clone, "reentrant-no-transformers-hook")
    _, grads = train_step(clone, "llama")
    assert all(g is not None for g in grads.values())


def test_a_model_without_checkpointing_support_is_refused():
    model = nn.Sequential(nn.Linear(4, 4))
    with pytest.raises(splice.SpliceError, match="does not support gradient checkpointing"):
        _enable_gradient_checkpointing(model)


def test_config_refuses_a_non_boolean():
    with pytest.raises(splice.SpliceError, match="gradient_checkpointing must be true or false"):
        TrainConfig(gradient_checkpointing="yes")


def test_training_run_with_checkpointing_matches_one_without(tiny_causal, tmp_path, monkeypatch):
    """The loop enables checkpointing on the model it trains, and the run is the same."""
    models = []
    attach = splice.attach
    monkeypatch.setattr(splice, "attach", lambda model, *a, **k: models.append(model) or attach(model, *a, **k))

    def losses(checkpointing: bool) -> list[float]:
        config = TrainConfig.from_dict(tiny_causal.to_dict(), max_steps=4, eval_every=4, output_dir=str(
            tmp_path / str(checkpointing)), gradient_checkpointing=checkpointing)
        return [h["loss"] for h in run(config, console=Console(quiet=True)).history]

    plain, checkpointed = losses(False), losses(True)
    assert [any(getattr(m, "gradient_checkpointing", False) for m in model.modules()) for model in models] == [
        False, True]
    assert checkpointed == pytest.approx(plain, rel=1e-5)


def test_cli_flag_sets_the_field(tiny_classification, tmp_path):
    import typer

    from splice.cli import train_cmd

    app = typer.Typer()
    train_cmd.register(app)
    path = tmp_path / "job.yaml"
    tiny_classification.to_yaml(path)
    out = tmp_path / "cli-run"
    result = CliRunner().invoke(app, ["train", str(path), "--max-steps", "2", "--gradient-checkpointing",
                                      "--output-dir", str(out)])
    assert result.exit_code == 0, result.output
    assert yaml.safe_load((out / "config.yaml").read_text())["gradient_checkpointing"] is True
