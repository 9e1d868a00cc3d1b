"""The static weight audit (splice.audit.static): exact features of hand-built weight changes,
exact robust z-scores on hand-built profiles, and a planted outlier among random LoRAs."""

from __future__ import annotations

import json
import math

import pytest
import torch
from helpers import make_bert, make_llama, randomize
from torch import nn

import splice
from splice.audit.static import ModuleProfile, StaticAudit, WeightProfile, static_audit, weight_profile
from splice.core.errors import SpliceError
from splice.core.heads import head_module
from splice.core.host import hosts

TARGETS = ["q_proj", "v_proj"]
PLANTED = "model.layers.1.self_attn.v_proj"
REFERENCES = [f"ref{i}" for i in range(8)]
SIGMA = 1.4826  # MAD x this estimates a normal standard deviation


def adapter_of(model: nn.Module, module: str, name: str = "default") -> nn.Module:
    return next(host[name] for module_name, _, host in hosts(model) if module_name == module)


def warned(findings: list) -> list:
    """The module warnings: the static audit's outliers (it raises no flags, see its module doc)."""
    return [f for f in findings if f.severity == "warning"]


def flagged(audit: StaticAudit) -> set[str]:
    return {f.subject for f in warned(audit.findings)}


def profile(**modules: dict[str, float]) -> WeightProfile:
    """A hand-built profile: {module: {feature: value}}."""
    return WeightProfile({m: ModuleProfile(m, features, []) for m, features in modules.items()})


# -- features ------------------------------------------------------------------------------------


def test_features_of_a_hand_built_change_are_exact():
    """ΔW = 2 · B A with singular values 3, 2, 1 (orthonormal U, V) and bias change 2 · b."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5))
    splice.attach(model, splice.LoRA(r=3, alpha=6, targets=["0"], lora_bias=True))
    U, V = torch.linalg.qr(torch.randn(5, 3))[0], torch.linalg.qr(torch.randn(6, 3))[0]
    adapter = adapter_of(model, "0")
    with torch.no_grad():
        adapter.lora_B.copy_(U * torch.tensor([3.0, 2.0, 1.0]) / 2)
        adapter.lora_A.copy_(V.T)
        adapter.lora_bias.copy_(torch.tensor([3.0, 0.0, 4.0, 0.0, 0.0]))

    module = weight_profile(model, model, top_k=2).modules["0"]

    p = torch.tensor([3.0, 2.0, 1.0]) / 6
    assert module.features == pytest.approx({
        "relative_norm": math.sqrt(14) / model[0].weight.norm().item(), "norm": math.sqrt(14),
        "spectral_share": 9 / 14, "effective_rank": math.exp(-(p * p.log()).sum().item()), "bias_norm": 10.0,
    }, rel=1e-6)
    assert module.top_singular_values == pytest.approx([3.0, 2.0], rel=1e-6)


def test_an_unchanged_module_has_zero_norm_share_and_rank():
    model = make_llama()
    splice.attach(model, splice.LoRA(r=4, targets=["q_proj"]))  # B = 0 at init
    for module in weight_profile(model).modules.values():
        assert module.features == {"norm": 0.0, "spectral_share": 0.0, "effective_rank": 0.0}


def test_relative_norm_is_the_change_over_the_base_weight_and_needs_the_base():
    model = make_llama()
    splice.attach(model, splice.LoRA(r=4, alpha=8, targets=TARGETS))
    randomize(model, seed=3)
    weights = {name: module.weight.detach().clone() for name, module, _ in hosts(model)}

    with_model, with_mapping = weight_profile(model, model), weight_profile(model, weights)

    for name, weight in weights.items():
        adapter = adapter_of(model, name)
        expected = (2 * adapter.lora_B @ adapter.lora_A).double().norm() / weight.double().norm()
        assert with_model.modules[name].features["relative_norm"] == pytest.approx(expected.item(), rel=1e-6)
        assert with_mapping.modules[name].features == with_model.modules[name].features
    assert all("relative_norm" not in m.features for m in weight_profile(model).modules.values())


def test_a_module_trained_in_full_is_profiled_by_its_copy_minus_the_original():
    """train_also=["1"]: the adapter's copy of the head is the original + D (singular values 3, 2,
    1) with bias + (3, 0, 4); read against the live model, whose head computes with the copy."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.Linear(5, 3))
    splice.attach(model, splice.LoRA(r=2, targets=["0"], train_also=["1"]))
    U, V = torch.linalg.qr(torch.randn(3, 3))[0], torch.linalg.qr(torch.randn(5, 3))[0]
    with torch.no_grad():
        head_module(model, "1", "default").weight.add_(U @ torch.diag(torch.tensor([3.0, 2.0, 1.0])) @ V.T)
        head_module(model, "1", "default").bias.add_(torch.tensor([3.0, 0.0, 4.0]))
    with splice.disabled(model):  # the original head
        original = model[1].weight.detach().clone()

    found = weight_profile(model, model, top_k=3)

    p = torch.tensor([3.0, 2.0, 1.0]) / 6
    assert found.modules["1"].features == pytest.approx({
        "relative_norm": math.sqrt(14) / original.norm().item(), "norm": math.sqrt(14), "spectral_share": 9 / 14,
        "effective_rank": math.exp(-(p * p.log()).sum().item()), "bias_norm": 5.0}, rel=1e-5)
    assert found.modules["1"].top_singular_values == pytest.approx([3.0, 2.0, 1.0], rel=1e-5)
    assert "train_also" in found.notes["1"] and "full-rank" in found.notes["1"]
    without_base = weight_profile(model)
    assert "1" not in without_base.modules and "no base weights" in without_base.notes["1"]
    audit = static_audit(model, None)
    assert [f.message for f in audit.findings if f.subject == "1"] == [without_base.notes["1"]]


def test_profile_of_a_saved_folder_equals_the_live_models(tmp_path):
    model = make_llama()
    splice.attach(model, splice.LoRA(r=4, targets=TARGETS, rslora=True))
    randomize(model, seed=5)
    splice.save(model, tmp_path / "adapter")

    live = weight_profile(model, model)
    saved = weight_profile(tmp_path / "adapter", make_llama())

    assert list(saved.modules) == list(live.modules) and len(live.modules) == 4
    for name, module in live.modules.items():
        assert saved.modules[name].features == pytest.approx(module.features, rel=1e-12)
        assert saved.modules[name].top_singular_values == pytest.approx(module.top_singular_values, rel=1e-12)


def test_a_dora_adapter_is_profiled_by_its_true_change():
    """The true change is W' − W0 after merging: not s·B A, which DoRA rescales row by row."""
    model = make_llama()
    splice.attach(model, splice.DoRA(r=4, targets=["q_proj"]))
    randomize(model, seed=7)
    name = "model.layers.0.self_attn.q_proj"
    before = model.get_submodule(name).weight.detach().clone()
    adapter = adapter_of(model, name)
    low_rank = (adapter.scaling * adapter.lora_B @ adapter.lora_A).double().norm().item()

    module = weight_profile(model, model).modules[name]
    with pytest.raises(splice.SpliceError, match="depends on the base weight"):
        weight_profile(model)
    splice.merge(model)
    true_change = (model.get_submodule(name).weight.detach() - before).double()

    assert module.features["norm"] == pytest.approx(true_change.norm().item(), rel=1e-4)
    assert module.top_singular_values == pytest.approx(torch.linalg.svdvals(true_change)[:8].tolist(), rel=1e-3)
    assert module.features["norm"] != pytest.approx(low_rank, rel=0.05)
    with pytest.raises(splice.SpliceError, match=r"adapter\(s\) \['default'\] merged into it"):
        weight_profile(model, model)


# -- robust z-scores -----------------------------------------------------------------------------


@pytest.mark.parametrize(("references", "value", "z"), [
    ([1.0, 2.0, 3.0, 4.0, 10.0], 6.0, 3.0 / SIGMA),   # median 3, MAD median(0, 1, 1, 2, 7) = 1
    ([1.0, 2.0, 4.0, 10.0], 0.0, -3.0 / (1.5 * SIGMA)),  # even: median 3, MAD (1 + 2) / 2 = 1.5
    ([2.0, 2.0, 2.0], 2.004, 2.0),                             # MAD 0: scale 0.001 · 2
    ([0.0, 0.0, 0.0], 1e-12, 1.0),                             # MAD 0 and median 0: scale 1e-12
])
def test_z_is_the_distance_from_the_median_in_robust_standard_deviations(references, value, z):
    audit = static_audit(profile(m={"norm": value}), references=[profile(m={"norm": v}) for v in references])

    assert audit.z == {"m": {"norm": pytest.approx(z, rel=1e-9)}}
    assert audit.score == pytest.approx(abs(z), rel=1e-9) and audit.worst == ("m", "norm")


def test_a_module_over_the_threshold_is_flagged_with_its_value_and_the_reference_median():
    references = [profile(a={"norm": v, "effective_rank": 2.0 + v / 10}, b={"norm": v}) for v in (1.0, 2.0, 3.0)]

    audit = static_audit(profile(a={"norm": 9.0, "effective_rank": 2.2}, b={"norm": 2.5}), references=references,
                         z_threshold=3.0)

    assert audit.z["a"]["norm"] == pytest.approx(7 / SIGMA) and audit.z["b"]["norm"] == pytest.approx(0.5 / SIGMA)
    (flag,) = warned(audit.findings)
    assert (flag.check, flag.subject) == ("static", "a")
    assert "norm = 9 against a reference median of 2 (z = +4.7)" in flag.message
    assert "effective_rank" not in flag.message  # its z is 0


def test_modules_and_features_the_references_lack_are_noted_not_compared():
    references = [profile(a={"norm": v}, c={"norm": v}) for v in (1.0, 2.0, 3.0)]
    references[0].modules["b"] = ModuleProfile("b", {"norm": 1.0}, [])

    audit = static_audit(profile(a={"norm": 2.0, "bias_norm": 1e6}, b={"norm": 1e6}), references=references)

    assert audit.z == {"a": {"norm": 0.0}} and not warned(audit.findings)
    notes = {f.subject: f.message for f in audit.findings if f.severity == "note"}
    assert "adapted by 1 of 3 references" in notes["b"]
    assert "bias_norm present in fewer than 3 references" in notes["a"]
    assert notes["modules"].endswith("adapted by references but not by this adapter: c")


def test_fewer_than_three_references_give_a_note_and_no_z_scores():
    references = [profile(a={"norm": 1.0}), profile(a={"norm": 1.1})]

    audit = static_audit(profile(a={"norm": 1e6}), references=references)

    assert (audit.z, audit.score, audit.worst, audit.references) == ({}, None, None, 2)
    (note,) = audit.findings
    assert (note.severity, note.subject) == ("note", "references")
    assert note.message.startswith("2 reference adapter(s) given; robust z-scores need at least 3")


def test_each_reference_is_scored_against_the_others():
    references = [profile(a={"norm": v}) for v in (1.0, 2.0, 3.0, 4.0, 20.0)]

    audit = static_audit(profile(a={"norm": 2.0}), references=references)

    others = [static_audit(r, references=references[:i] + references[i + 1:]).score for i, r in enumerate(references)]
    assert audit.reference_scores == pytest.approx(others)
    assert audit.reference_scores[-1] == pytest.approx(17.5 / SIGMA)  # median 2.5 and MAD 1 of the others
    assert "1 of 5 references would themselves be flagged" in audit.findings[-1].message


def test_three_references_say_they_could_not_be_scored_against_each_other():
    references = [profile(a={"norm": v}) for v in (1.0, 2.0, 3.0)]

    audit = static_audit(profile(a={"norm": 2.0}), references=references)

    assert audit.reference_scores == [None, None, None]
    assert "the references could not be scored against each other (each needs 3 others: give 4 or more" \
        in audit.findings[-1].message


def test_a_reference_of_another_base_is_named_in_the_error(tmp_path):
    llama, bert = make_llama(), make_bert()
    splice.attach(llama, splice.LoRA(r=2, targets=["q_proj"]))
    splice.attach(bert, splice.LoRA(r=2, targets=["query"]))
    other = splice.save(bert, tmp_path / "bert-lora")
    with pytest.raises(SpliceError, match=rf"reference {other}: the base model has no module .*query.*a reference "
                                          r"must adapt the same base model"):
        static_audit(llama, base=make_llama(), references=[other, other, other])


def test_modules_are_profiled_in_layer_order(tmp_path):
    """A saved file's keys come sorted as text (layer 10 before layer 2); the profile, its table
    and its plot follow the layers."""
    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Linear(4, 4) for _ in range(12)])
    splice.attach(model, splice.LoRA(r=2, targets=[str(i) for i in range(12)]))
    randomize(model)
    folder = splice.save(model, tmp_path / "twelve")
    assert list(weight_profile(folder).modules) == [str(i) for i in range(12)]


# -- random LoRAs with a planted outlier ---------------------------------------------------------


@pytest.fixture(scope="module")
def population() -> tuple[nn.Module, WeightProfile]:
    """A tiny Llama with eight reference LoRAs, a benign candidate and a planted one, all drawn
    alike (rank 4, factors N(0, 0.3²), one seed each); the planted one's B at PLANTED is then
    scaled by 50. Returned with the planted adapter's profile before the scaling."""
    model = make_llama()
    for seed, name in enumerate([*REFERENCES, "benign", "planted"]):
        splice.attach(model, splice.LoRA(r=4, targets=TARGETS), name=name)
        randomize(model, name, seed=seed)
    before = weight_profile((model, "planted"), model)
    with torch.no_grad():
        adapter_of(model, PLANTED, "planted").lora_B.mul_(50)
    return model, before


def audit_of(model: nn.Module, adapter: str | WeightProfile) -> StaticAudit:
    source = adapter if isinstance(adapter, WeightProfile) else (model, adapter)
    return static_audit(source, model, [(model, name) for name in REFERENCES])


def test_a_planted_outlier_is_flagged_at_its_module(population):
    model, before = population

    audit, unplanted = audit_of(model, "planted"), audit_of(model, before)

    assert audit.worst == (PLANTED, "relative_norm") and audit.score > 100
    assert flagged(audit) - flagged(unplanted) == {PLANTED}  # the scaling adds that module's flag, no other
    flag = next(f for f in audit.findings if f.subject == PLANTED)
    median = audit.reference_stats[PLANTED]["relative_norm"].median
    assert f"relative_norm = {audit.profile.modules[PLANTED].features['relative_norm']:.4g} against a reference " \
           f"median of {median:.4g}" in flag.message


def test_a_benign_adapter_from_the_same_distribution_is_not_flagged(population):
    """One draw: against 8 references about a quarter of such adapters get some |z| > 3.5 (module
    doc); the references' own scores against each other say so in the summary."""
    model, _ = population

    audit = audit_of(model, "benign")

    assert not flagged(audit) and audit.score < 3.5
    assert len(audit.reference_scores) == 8
    assert audit.findings[-1].message.startswith("16 features of 4 modules compared with 8 reference adapters")


def test_the_audit_is_json_a_markdown_table_and_a_png(population, tmp_path):
    model, _ = population
    audit = audit_of(model, "planted")

    data = json.loads(json.dumps(audit.as_dict()))
    table = audit.table().splitlines()
    path = audit.plot(tmp_path / "static.png")
    few = static_audit((model, "benign"), model, [(model, "ref0")]).plot(tmp_path / "few.png")

    assert data["score"] == audit.score and data["worst"] == list(audit.worst)
    assert data["z"][PLANTED]["norm"] == audit.z[PLANTED]["norm"]
    assert [f["subject"] for f in data["findings"]] == [f.subject for f in audit.findings]
    assert table[0] == "| module | relative_norm | norm | spectral_share | effective_rank | σ1 | max abs z |"
    assert len(table) == 2 + 4
    assert next(row for row in table if row.startswith(f"| {PLANTED} ")).endswith(
        f"| **{audit.score:.1f} (relative_norm)** |")
    for png in (path, few):
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# -- refusals ------------------------------------------------------------------------------------


def test_refusals_name_the_offending_value():
    model = make_llama()
    splice.attach(model, splice.LoRA(r=4, targets=["q_proj"]))
    randomize(model, seed=1)
    name = "model.layers.0.self_attn.q_proj"

    with pytest.raises(splice.SpliceError, match="top_k must be >= 1, got 0"):
        weight_profile(model, top_k=0)
    with pytest.raises(splice.SpliceError, match="z_threshold must be > 0, got 0"):
        static_audit(model, z_threshold=0)
    with pytest.raises(splice.SpliceError, match=f"the base mapping has no module '{name}'"):
        weight_profile(model, {})
    with pytest.raises(splice.ShapeMismatchError, match=rf"base weight of {name} has shape \(3, 3\)"):
        weight_profile(model, {name: torch.zeros(3, 3)})
    with torch.no_grad():
        adapter_of(model, name).lora_B[0, 0] = float("nan")
    with pytest.raises(splice.SpliceError, match=f"lora_B at {name} holds 1 NaN values"):
        weight_profile(model)
