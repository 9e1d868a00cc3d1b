"""The routing plan cache: per `route` block and host, the gathered factor stacks are built once
and reused for every forward (decoding: every token), and rebuilt exactly when what they were
built from changes. Each case checks the routed output against every row run alone
(`one_by_one`, which never uses a plan) and counts how often plans are built."""

from __future__ import annotations

import pytest
import torch
from test_routing import ROWS, batch, one_by_one, outputs, use, with_adapters
from torch import nn

import splice
from splice.core import routing as routing_module
from splice.core.host import hosts

LoRA = splice.LoRA


@pytest.fixture
def builds(monkeypatch) -> list[int]:
    """One entry per plan built (any host, any routing)."""
    built: list[int] = []
    original = routing_module._Plan.__init__

    def spy(self, *args, **kwargs):
        built.append(1)
        original(self, *args, **kwargs)

    monkeypatch.setattr(routing_module._Plan, "__init__", spy)
    return built


def linear_hosts(model: nn.Module) -> int:
    return sum(1 for _, _, host in hosts(model) if host.info.kind == "linear")


def routed(model: nn.Module, ids: torch.Tensor, rows: list[str | None] = ROWS) -> torch.Tensor:
    with splice.route(model, rows):
        return outputs(model, ids)


def assert_rows_alone(model: nn.Module, ids: torch.Tensor, got: torch.Tensor, rows: list[str | None] = ROWS) -> None:
    expected = one_by_one(model, ids, rows)
    assert torch.allclose(got, expected, rtol=0, atol=1e-5), (got - expected).abs().max()


# -- built once ------------------------------------------------------------------------------


@pytest.mark.parametrize("options", [{}, {"num_beams": 3}, {"num_beams": 3, "num_return_sequences": 2}],
                         ids=["greedy", "beam", "beam-2-returned"])
def test_generate_builds_each_plan_once(options, builds):
    """Every token of every step reuses the plans: beam search reorders rows within each prompt's
    beams, which share the prompt's adapter, so the row count changes and the plans do not."""
    model = with_adapters("llama")
    model.generation_config.eos_token_id = None
    rows = ["a", None, "c", "b"]
    ids = batch(len(rows), length=5, seed=3)
    common = {"max_new_tokens": 5, "do_sample": False, "pad_token_id": 0, **options}
    with torch.no_grad(), splice.route(model, rows):
        tokens = model.generate(input_ids=ids, **common)
    assert len(builds) == linear_hosts(model)
    alone = []
    for i, name in enumerate(rows):
        use(model, name)
        alone.append(model.generate(input_ids=ids[i: i + 1], **common))
    assert torch.equal(tokens, torch.cat(alone))


def test_rows_repeated_within_one_block(builds):
    """Each id covers `repeat` consecutive rows; a forward with 3 rows per id reuses the plans."""
    model = with_adapters("llama")
    ids = batch(len(ROWS))
    wide = ids.repeat_interleave(3, dim=0)
    with splice.route(model, ROWS):
        narrow_out, wide_out = outputs(model, ids), outputs(model, wide)
    assert len(builds) == linear_hosts(model)
    assert_rows_alone(model, ids, narrow_out)
    assert torch.allclose(wide_out, narrow_out.repeat_interleave(3, dim=0), rtol=0, atol=1e-5)


# -- rebuilt when a source changes -------------------------------------------------------------


def change_factor_in_place(model: nn.Module) -> None:
    with torch.no_grad():
        next(host for _, _, host in hosts(model) if "a" in host)["a"].lora_B.mul_(-2.0)


def optimizer_step(model: nn.Module) -> None:
    params = list(splice.trainable_parameters(model).values())
    for p in params:
        p.grad = torch.ones_like(p)
    torch.optim.SGD(params, lr=0.05).step()


def replace_parameter(model: nn.Module) -> None:
    """A new Parameter object (what `load_state_dict(assign=True)` does): same version counter 0."""
    adapter = next(host for _, _, host in hosts(model) if "b" in host)["b"]
    adapter.lora_A = nn.Parameter(adapter.lora_A.detach() * 3.0)


def restore_checkpoint(model: nn.Module, assign: bool = False) -> None:
    """`load_state_dict` of other values for adapter "a": copied into the tensors (a checkpoint
    restore), or with `assign=True` as new tensor objects. (`splice.load` attaches new hosts,
    which a `route` block opened before does not route; between blocks every plan is new.)"""
    state = {k: v * 1.5 for k, v in model.state_dict().items() if ".splice.a." in k}
    model.load_state_dict(state, strict=False, assign=assign)


def merge_and_unmerge(model: nn.Module) -> None:
    """Changes the base weights and back (to rounding), not the factors: the plans stay valid."""
    splice.merge(model, "b")
    splice.unmerge(model, "b")


CHANGES = {"in place under no_grad": change_factor_in_place, "optimizer step": optimizer_step,
           "new parameter object": replace_parameter, "load_state_dict": restore_checkpoint,
           "load_state_dict assign": lambda model: restore_checkpoint(model, assign=True),
           "merge and unmerge": merge_and_unmerge}


@pytest.mark.parametrize("change", CHANGES, ids=list(CHANGES))
def test_a_change_inside_the_block_rebuilds_the_plans(change, builds):
    model = with_adapters("llama")
    splice.activate(model, ["a", "b", "c"])
    ids = batch(len(ROWS))
    with splice.route(model, ROWS):
        before = outputs(model, ids)
        outputs(model, ids)  # nothing changed: no rebuild
        assert len(builds) == linear_hosts(model)
        CHANGES[change](model)
        after = outputs(model, ids)
    assert_rows_alone(model, ids, after)
    if change == "merge and unmerge":
        assert len(builds) == linear_hosts(model)
        assert torch.allclose(after, before, rtol=0, atol=1e-5)
    else:
        assert len(builds) > linear_hosts(model)
        assert not torch.allclose(after, before, rtol=0, atol=1e-4)


def test_attaching_another_adapter_inside_the_block_rebuilds_and_keeps_the_rows(builds):
    model = with_adapters("llama")
    ids = batch(len(ROWS))
    with splice.route(model, ROWS):
        before = outputs(model, ids)
        splice.attach(model, LoRA(r=2, targets=["q_proj"]), "late")
        after = outputs(model, ids)
    assert len(builds) > linear_hosts(model)
    assert torch.allclose(after, before, rtol=0, atol=1e-6)  # "late" is routed to no row


@pytest.mark.parametrize("length", [routing_module.TOKENS_FOR_TRANSPOSED - 1, routing_module.TOKENS_FOR_TRANSPOSED + 2])
def test_both_orientations_of_the_batched_product(length):
    """Below TOKENS_FOR_TRANSPOSED tokens a row the grouped path computes x A^T, from it (A x^T)^T:
    with and without autograd, every row equals that row alone."""
    model = with_adapters("llama")
    ids = batch(len(ROWS), length=length, seed=7)
    with torch.enable_grad(), splice.route(model, ROWS):
        with_grad = model(input_ids=ids, output_hidden_states=True)
    with_grad = torch.cat([with_grad.hidden_states[-1].flatten(1), with_grad.logits.flatten(1)], dim=1).detach()
    assert_rows_alone(model, ids, routed(model, ids))
    assert_rows_alone(model, ids, with_grad)
