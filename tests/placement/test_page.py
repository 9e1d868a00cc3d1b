"""PAGE (placement scores) and DomLoRA: the spec's identities, the planted site, and attach/save."""

from __future__ import annotations

import copy
import math

import helpers
import pytest
import torch

import splice
from splice.core.host import hosts
from splice.placement import page

R = 4


def llama_batches(n: int = 2, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    generator = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(n):
        ids = torch.randint(0, helpers.VOCAB, (3, 9), generator=generator)
        batches.append({"input_ids": ids, "labels": ids})
    return batches


def test_page_equals_the_squared_gradient_of_a_zero_B_lora():
    model = helpers.make_llama()
    batch = llama_batches(1)[0]
    lora_model = copy.deepcopy(model)
    splice.attach(lora_model, splice.LoRA(r=R, alpha=8, targets="all-linear"))
    lora_model.eval()
    lora_model(**batch).loss.backward()
    A = {name: host["default"].lora_A for name, _, host in hosts(lora_model)}
    scores = {s.name: s for s in page(model, [batch], "all-linear", r=R, alpha=8, score="sampled", factors=A).sites}
    assert set(scores) == set(A)
    for name, _, host in hosts(lora_model):
        adapter = host["default"]
        assert torch.count_nonzero(adapter.lora_A.grad) == 0  # B = 0: A gets nothing at step 0
        want = adapter.lora_B.grad.square().sum().item()
        assert math.isclose(scores[name].sampled, want, rel_tol=1e-5, abs_tol=1e-12), name


def test_expected_score_is_the_mean_over_random_A():
    model = helpers.make_llama()
    batch = llama_batches(1)[0]
    name = "model.layers.0.mlp.down_proj"
    layer = model.get_submodule(name)
    layer.weight.requires_grad_(True)
    model(**batch).loss.backward()
    G = layer.weight.grad  # the full-weight gradient the hooks never form
    scaling, fan_in = 2.0, G.shape[1]
    generator = torch.Generator().manual_seed(1)
    draws = [((torch.rand(R, fan_in, generator=generator) * 2 - 1) / math.sqrt(fan_in)) for _ in range(500)]
    monte_carlo = sum((scaling * G @ A.T).square().sum().item() for A in draws) / len(draws)
    layer.weight.grad = None
    layer.weight.requires_grad_(False)
    expected = next(s for s in page(model, [batch], [name], r=R).sites).expected
    assert math.isclose(expected, scaling**2 * R * G.square().sum().item() / (3 * fan_in), rel_tol=1e-5)
    assert abs(monte_carlo - expected) < 0.05 * expected


def test_page_leaves_the_model_and_its_gradients_unchanged():
    model = helpers.make_llama()  # not frozen: PAGE must still form no weight gradient
    model.model.embed_tokens.weight.requires_grad_(False)
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    before = {n: p.clone() for n, p in model.state_dict().items()}
    placement = page(model, llama_batches(), "all-linear", r=R)
    assert placement.batches == 2
    assert all(p.grad is None for p in model.parameters())
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert all(torch.equal(before[n], p) for n, p in model.state_dict().items())
    assert math.isclose(sum(s.share for s in placement.sites), 1.0, rel_tol=1e-9)
    assert [s.expected for s in placement.sites] == sorted((s.expected for s in placement.sites), reverse=True)


def test_the_planted_site_trains_best_and_leads_its_module_type():
    """A teacher differs from the student by a rank-2 change of one down-projection (spec test 3).

    An adapter there beats a same-rank adapter elsewhere, and PAGE ranks it first among the
    down-projections. The spec also expects it first among *all* modules; that does not hold:
    here (and on SmolLM2, where the planted module ranks 24th-34th of 210) the value and output
    projections of the first layer, whose inputs are larger, take the most gradient energy.
    """
    student = helpers.make_llama()
    teacher = copy.deepcopy(student)
    planted = "model.layers.1.mlp.down_proj"
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        weight = teacher.get_submodule(planted).weight
        weight += 0.5 * torch.randn(weight.shape[0], 2, generator=generator) @ torch.randn(2, weight.shape[1],
                                                                                          generator=generator)
    inputs = [torch.randint(0, helpers.VOCAB, (4, 10), generator=generator) for _ in range(8)]
    with torch.no_grad():
        targets = [teacher(input_ids=ids).logits for ids in inputs]

    def loss_fn(model, i):
        return torch.nn.functional.mse_loss(model(input_ids=inputs[i]).logits, targets[i])

    assert page(student, range(len(inputs)), ["down_proj"], r=2, loss_fn=loss_fn).top(1) == [planted]

    def final_loss(target: str) -> float:
        model = copy.deepcopy(student)
        splice.attach(model, splice.LoRA(r=2, alpha=4, targets=[target]))
        optimizer = torch.optim.Adam(splice.trainable_parameters(model).values(), lr=1e-2)
        for step in range(200):
            optimizer.zero_grad()
            loss_fn(model, step % len(inputs)).backward()
            optimizer.step()
        with torch.no_grad():
            return sum(loss_fn(model, i).item() for i in range(len(inputs))) / len(inputs)

    assert final_loss(planted) * 2 <= final_loss("model.layers.0.self_attn.q_proj")


def test_parameter_arithmetic_of_one_down_projection_in_llama_3_8b():
    """The spec's 0.70%: one down_proj adapter against all seven linear layers of 32 layers."""
    hidden, ffn, kv, layers = 4096, 14336, 1024, 32
    shapes = [(hidden, hidden), (hidden, kv), (hidden, kv), (hidden, hidden), (hidden, ffn), (hidden, ffn),
              (ffn, hidden)]  # (in, out) of q, k, v, o, gate, up, down
    per_rank_all = layers * sum(i + o for i, o in shapes)
    per_rank_down = ffn + hidden
    assert per_rank_all == 2_621_440 and per_rank_down == 18_432
    assert round(100 * per_rank_down / per_rank_all, 2) == 0.70


# -- DomLoRA ------------------------------------------------------------------------------------


def test_domlora_attaches_at_the_top_modules_and_reloads_without_a_probe(tmp_path):
    model = helpers.make_llama()
    batches = llama_batches()
    placement = page(model, batches, "all-linear", r=R)
    splice.attach(model, splice.DomLoRA(r=R, top_k=2, probe=batches))
    assert sorted(n for n, _, _ in hosts(model)) == sorted(placement.top(2))
    config = splice.adapters(model)["default"]
    assert isinstance(config, splice.LoRA) and sorted(config.targets) == sorted(placement.top(2))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_()
    splice.save(model, tmp_path / "a")
    reloaded = splice.load(helpers.make_llama(), tmp_path / "a")
    ids = batches[0]["input_ids"]
    assert torch.equal(reloaded(input_ids=ids).logits, model(input_ids=ids).logits)


def test_domlora_composes_with_other_forms():
    model = helpers.make_llama()
    splice.attach(model, splice.DomLoRA(r=R, form={"method": "dora", "dropout": 0.1}, probe=llama_batches()))
    config = splice.adapters(model)["default"]
    assert isinstance(config, splice.DoRA) and config.dropout == 0.1 and config.r == R and len(config.targets) == 1


@pytest.mark.parametrize(("options", "message"), [
    ({}, "probe batches"),
    ({"form": {"method": "loreft"}}, "bad 'loreft' config"),
    ({"form": "nosuch"}, "unknown adapter method"),
    ({"top_k": 0}, "top_k"),
    ({"form": {"method": "lora", "r": R + 1}}, "DomLoRA form gives r="),
])
def test_domlora_bad_settings_are_explained(options, message):
    with pytest.raises(splice.SpliceError, match=message):
        splice.attach(helpers.make_llama(), splice.DomLoRA(r=R, **options))
