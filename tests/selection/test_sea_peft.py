"""SEA-PEFT's audit loop on tiny models: the planted useful unit is found within 5 audits, the
budget holds at every audit, guard cycles are kept, a switched-off unit neither trains nor
changes the output; the export attaches and trains (one LoRA mapping with a rank pattern, or
mixed forms); bad settings are refused; `splice autoconfig` end to end."""

from __future__ import annotations

import copy
import dataclasses
import json

import pytest
import torch
import typer
import yaml
from helpers import make_bert, minilm_tokenizer, randomize, save_tiny_bert
from rich.console import Console
from sea_peft_toy import Gated, branch_space, sentiment_rows, toy_config
from typer.testing import CliRunner

import splice
from splice.core.errors import ConfigError, SpliceError
from splice.core.targets import named_base_modules
from splice.selection.sea_peft import (
    SeaPeftConfig,
    Search,
    attach_units,
    candidate_specs,
    export,
    finetune,
    unit_modules,
)
from splice.train import TrainConfig
from splice.train.data import load_splits


@pytest.fixture(scope="module")
def tokenizer():
    return minilm_tokenizer()


@pytest.fixture(scope="module")
def tiny_bert_dir(tmp_path_factory):
    return save_tiny_bert(tmp_path_factory.mktemp("tiny-bert"), dropout=0.0)


def toy_search(tmp_path, tokenizer, live=6, seed=0, on_audit=None, **space) -> Search:
    config = toy_config(tmp_path, seed=seed)
    return Search(Gated(live=live, seed=seed), tokenizer, config, branch_space(**space), splits=load_splits(config),
                  heads=[], on_audit=on_audit)


@pytest.mark.parametrize("initial", ["empty", "fill"])
@pytest.mark.parametrize(("live", "seed"), [(6, 0), (1, 1), (9, 2), (0, 3)])
def test_the_planted_useful_unit_is_selected_within_five_audits(tmp_path, tokenizer, live, seed, initial):
    """Ten LoRA units, one per branch; only the live branch's can change the output. The budget
    holds two units; the search starts from none or from a random fill: the planted unit is
    active after at most five audits and stays, and every other unit measured exactly zero."""
    search = toy_search(tmp_path, tokenizer, live=live, seed=seed, initial=initial)
    planted = next(u.name for u in search.units if u.site == f"b{live}")
    selection = search.run()
    first = next(a["audit"] for a in selection.audits if planted in a["active"])
    assert first <= 4
    assert all(planted in a["active"] for a in selection.audits[first:])
    assert planted in selection.chosen
    deltas = {m["unit"]: m["delta"] for a in selection.audits for m in a["measured"]}
    assert deltas[planted] > 0 and all(d == 0.0 for u, d in deltas.items() if u != planted)
    assert selection.adapters["lora"]["targets"] == sorted(f"branches.{int(u.site[1:])}" for u in search.units
                                                           if u.name in selection.chosen)


def test_the_budget_holds_at_every_audit_and_in_every_probe_by_splices_count(tmp_path, tokenizer):
    def check(entry):
        summary = splice.summary(search.model)
        active = sum(a.parameters for a in summary.adapters if a.active)
        assert active == entry["active_params"] <= search.space.budget
        checked.append(entry["audit"])

    checked: list[int] = []
    search = toy_search(tmp_path, tokenizer, budget=3 * 128, on_audit=check, audits=6)
    original = search.trainer.step
    trainable_seen = []

    def step():  # what trains during each step, probes included
        trainable_seen.append(sum(p.numel() for n, p in splice.trainable_parameters(search.model).items()))
        return original()

    search.trainer.step = step
    search.run()
    assert checked == list(range(6))
    assert max(trainable_seen) <= search.space.budget


def test_guard_cycles_and_hysteresis_hold_in_the_loop(tmp_path, tokenizer):
    search = toy_search(tmp_path, tokenizer, audits=8, audit_fraction=0.5, guard=3, initial="fill")
    selection = search.run()
    last_switch: dict[str, int] = {}
    for audit in selection.audits:
        for name in audit["on"] + audit["off"]:
            if name in last_switch:
                assert audit["audit"] - last_switch[name] > 3, (name, last_switch[name], audit["audit"])
            last_switch[name] = audit["audit"]
        values = audit["switched_values"]
        assert all(values[name] is not None and values[name] > 0 for name in audit["on"])
        for name in audit["off"]:  # dropped below -0.02, or outranked by better units under the budget
            assert values[name] is None or values[name] < -0.02 or any(
                values[n] >= values[name] for n in audit["on"])
    assert last_switch  # something did switch


def test_a_switched_off_unit_gets_no_gradient_is_not_moved_and_changes_nothing(tmp_path, tokenizer):
    search = toy_search(tmp_path, tokenizer, initial=["u006_b6_lora"])
    model = search.model
    off = "u003_b3_lora"
    randomize(model, off, seed=1)  # a unit that would change the output if it were on
    before = {i: p.detach().clone() for i, p in enumerate(search.params[off])}
    on_before = [p.detach().clone() for p in search.params["u006_b6_lora"]]
    for _ in range(3):
        search.trainer.step()
    assert all(torch.equal(p, before[i]) for i, p in enumerate(search.params[off]))  # AdamW left it alone
    assert any(not torch.equal(p, q) for p, q in zip(search.params["u006_b6_lora"], on_before, strict=True))
    batch = next(iter(search.trainer.loaders["validation"]))
    model.train()
    model(**batch).loss.backward()
    assert all(p.grad is None for p in search.params[off])
    assert any(p.grad is not None for p in search.params["u006_b6_lora"])
    model.zero_grad(set_to_none=True)

    # On a BERT with LoRA and LoReFT units: the model with a unit off computes what it computes
    # with that unit detached.
    bert = make_bert()
    space = SeaPeftConfig(budget=10**6, sites={"q": ["query"]}, layers=[0, 1],
                          families=[{"method": "lora", "r": 2}, {"method": "loreft", "r": 2, "positions": "f1"}])
    units = attach_units(bert, candidate_specs(bert, space))
    for i, u in enumerate(units):
        randomize(bert, u.name, scale=0.2, seed=i)
    ids = torch.randint(1, 90, (2, 9), generator=torch.Generator().manual_seed(0))
    for dropped in units:
        kept = [u.name for u in units if u is not dropped]
        splice.activate(bert, kept)
        other = copy.deepcopy(bert)
        splice.detach(other, dropped.name)
        splice.activate(other, kept)
        with torch.no_grad():
            assert torch.equal(bert(ids).logits, other(ids).logits)
        splice.activate(bert, [u.name for u in units])
        with torch.no_grad():
            assert not torch.equal(bert(ids).logits, other(ids).logits)


def test_candidates_are_sites_by_layers_by_family_candidates_with_splices_counts():
    bert = make_bert()
    space = SeaPeftConfig(budget=10**6, sites={"q": ["query"], "ffn": ["intermediate.dense"]}, layers=[0, 1],
                          families=[{"method": "lora", "r": [2, 4]}, {"method": "dora", "r": 2},
                                    {"method": "diablo", "blocks": 8}, {"method": "loreft", "r": 2}])
    units = attach_units(bert, candidate_specs(bert, space))
    assert len(units) == 2 * 2 * 4 + 2  # layers x sites x (lora r2, r4, dora, diablo) + loreft per layer
    by = {(u.site, u.family, u.config.get("r"), u.config.get("blocks")): u for u in units}
    assert by[("L0.q", "lora", 2, None)].params == 2 * (32 + 32)
    assert by[("L1.ffn", "lora", 4, None)].params == 4 * (32 + 40)
    assert by[("L0.q", "dora", 2, None)].params == 2 * 64 + 32  # + the magnitude vector
    assert by[("L0.ffn", "diablo", None, 8)].params == 32 * 40 // 8
    assert by[("L1.block", "loreft", 2, None)].config["targets"] == ["bert.encoder.layer.1"]
    assert by[("L0.q", "lora", 4, None)].config["alpha"] == 8  # alpha = 2r by default
    modules = unit_modules(bert)
    assert modules[by[("L1.q", "lora", 2, None)].name] == ["bert.encoder.layer.1.attention.self.query"]
    assert {a.name: a.parameters for a in splice.summary(bert).adapters} == {u.name: u.params for u in units}


def test_export_is_one_lora_mapping_with_a_rank_pattern_and_one_per_other_form(tiny_bert_dir, tmp_path):
    """Mixed ranks are one LoRA config (targets + rank_pattern) that attaches to the same modules
    with the same ranks; mixed forms are one config per form, which `finetune` trains together."""
    bert = make_bert()
    space = SeaPeftConfig(budget=10**6, sites={"q": ["query"], "v": ["value"]}, layers=[0, 1],
                          families=[{"method": "lora", "r": [2, 4]}, {"method": "loreft", "r": 2, "positions": "f1"}])
    units = attach_units(bert, candidate_specs(bert, space))
    pick = {(u.site, u.family, u.config.get("r")): u.name for u in units}
    chosen = [pick[("L0.q", "lora", 2)], pick[("L1.q", "lora", 4)], pick[("L1.v", "lora", 4)],
              pick[("L0.block", "loreft", 2)]]
    all_modules = [n for n, _ in named_base_modules(bert) if n]
    adapters = export(units, chosen, unit_modules(bert), all_modules)
    assert list(adapters) == ["lora", "loreft"]
    lora = adapters["lora"]
    assert lora["r"] == 4 and lora["alpha"] == 8 and sorted(lora["targets"]) == sorted(
        ["bert.encoder.layer.0.attention.self.query", "bert.encoder.layer.1.attention.self.query",
         "bert.encoder.layer.1.attention.self.value"])
    assert list(lora["rank_pattern"].values()) == [2] and list(lora["alpha_pattern"].values()) == [4]
    assert adapters["loreft"]["targets"] == ["bert.encoder.layer.0"] and adapters["loreft"]["positions"] == "f1"
    yaml.safe_load(yaml.safe_dump(adapters))  # plain YAML

    fresh = make_bert()
    splice.attach(fresh, splice.config_from_dict(lora), "x")
    ranks = {name: adapter.lora_A.shape[0] for name, _, host in splice.core.host.hosts(fresh)
             for key, adapter in host.items() if key == "x"}
    assert ranks == {"bert.encoder.layer.0.attention.self.query": 2, "bert.encoder.layer.1.attention.self.query": 4,
                     "bert.encoder.layer.1.attention.self.value": 4}
    assert sum(a.parameters for a in splice.summary(fresh).adapters) == sum(
        u.params for u in units if u.name in chosen[:3])

    rows = sentiment_rows(64, 1)
    config = TrainConfig(model=str(tiny_bert_dir), data=rows, validation=sentiment_rows(16, 2), batch_size=8,
                         max_steps=4, eval_every=2, lr=1e-2, output_dir=str(tmp_path / "mixed"))
    mixed = finetune(config, adapters, console=Console(quiet=True))
    assert mixed.status == "finished" and len(mixed.history) == 4
    assert (tmp_path / "mixed" / "adapter").is_dir() and (tmp_path / "mixed" / "adapter-loreft").is_dir()
    single = finetune(dataclasses.replace(config, output_dir=str(tmp_path / "single")), {"lora": lora},
                      console=Console(quiet=True))
    saved = json.loads((tmp_path / "single" / "adapter" / "adapter_config.json").read_text())
    assert single.status == "finished" and saved["r"] == 4 and list(saved["rank_pattern"].values()) == [2]


@pytest.mark.parametrize(("fields", "match"), [
    ({"budget": 0}, "budget must be an integer >= 1"),
    ({"budget": 10, "audit_fraction": 1.5}, "audit_fraction"),
    ({"budget": 10, "ema": 1.0}, "ema must be in"),
    ({"budget": 10, "drop_below": 0.1}, "drop_below"),
    ({"budget": 10, "metric": "f1"}, "metric must be"),
    ({"budget": 10, "sites": ["query"]}, "sites must be"),
    ({"budget": 10, "layers": []}, "layers must be"),
    ({"budget": 10, "initial": "all"}, "initial must be"),
    ({"budget": 10, "families": []}, "families must be"),
    ({"budget": 10, "families": [{"r": 4}]}, "'method' key"),
    ({"budget": 10, "families": [{"method": "lorra"}]}, "lora"),
    ({"budget": 10, "families": [{"method": "lora", "targets": ["query"]}]}, "places the units itself"),
    ({"budget": 10, "families": [{"method": "lora", "r": []}]}, "lists no candidates"),
    ({"budget": 10, "families": [{"method": "lora", "r": [0, 4]}]}, "rank r must be >= 1"),
    ({"budget": 10, "audits": 0}, "audits must be"),
    ({"budget": 10, "seed": -1}, "seed must be an integer >= 0, got -1"),
    ({"budget": 10, "ema": True}, "ema must be in .*got True"),
    ({"budget": 10, "add_above": "0.1"}, "add_above must be a number"),
])
def test_bad_settings_are_refused_with_the_key_at_fault(fields, match):
    with pytest.raises(ConfigError, match=match):
        SeaPeftConfig(**fields)


def test_bad_inputs_to_the_search_are_refused(tmp_path, tokenizer):
    with pytest.raises(ConfigError, match="unknown sea_peft setting 'budjet'; did you mean 'budget'"):
        SeaPeftConfig.from_dict({"budjet": 10})
    with pytest.raises(ConfigError, match="needs a parameter budget"):
        SeaPeftConfig.from_dict({})
    with pytest.raises(ConfigError, match="below the smallest unit"):
        toy_search(tmp_path, tokenizer, budget=100)
    with pytest.raises(ConfigError, match="not candidates"):
        toy_search(tmp_path, tokenizer, initial=["nope"])
    with pytest.raises(ConfigError, match="more parameters than the budget"):
        toy_search(tmp_path, tokenizer, initial=["u000_b0_lora", "u001_b1_lora", "u002_b2_lora"])
    with pytest.raises(splice.TargetError):
        toy_search(tmp_path, tokenizer, sites={"x": ["no_such_module"]})
    config = toy_config(tmp_path)
    model = Gated()
    splice.attach(model, splice.LoRA(targets=["branches.0"]))
    with pytest.raises(SpliceError, match="already carries adapters"):
        Search(model, tokenizer, config, branch_space(), splits=load_splits(config), heads=[])


def test_splice_autoconfig_searches_exports_and_fine_tunes(tiny_bert_dir, tmp_path):
    from splice.cli import select_cmd

    app = typer.Typer()
    select_cmd.register(app)
    app.command("unused")(lambda: None)  # two commands, so typer keeps the command name
    train = tmp_path / "train.jsonl"
    train.write_text("".join(json.dumps(r) + "\n" for r in sentiment_rows(64, 1)))
    job = {"model": str(tiny_bert_dir), "data": str(train), "batch_size": 8, "max_length": 16, "lr": 1e-2,
           "max_steps": 4, "eval_every": 2,
           "sea_peft": {"budget": 600, "sites": {"q": ["query"], "v": ["value"]}, "layers": [0, 1],
                        "families": [{"method": "lora", "r": [2, 4]}], "warmup": 2, "audit_every": 2, "audits": 2}}
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(job))
    out = tmp_path / "out"
    runner = CliRunner()
    result = runner.invoke(app, ["autoconfig", str(path), "--output-dir", str(out), "--budget", "500"],
                           env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    report = json.loads((out / "sea_peft.json").read_text())
    assert report["budget"] == 500 and 0 < report["params"] <= 500 and len(report["audits"]) == 2
    assert len(report["units"]) == 2 * 2 * 2
    selected = TrainConfig.from_yaml(out / "selected.yaml")  # what `splice train` would run
    assert selected.adapter == yaml.safe_load((out / "selected_adapters.yaml").read_text())["lora"]
    assert selected.output_dir == str(out / "retrain")  # not the fine-tuning run's folder
    assert json.loads((out / "finetune" / "metrics.json").read_text())["status"] == "finished"
    assert "chose" in result.output and "fine-tuned" in result.output and "selected.yaml" in result.output
    assert not (out / ".splice-run.lock").exists()  # the folder's lock is given back

    again = runner.invoke(app, ["autoconfig", str(path), "--output-dir", str(out)], env={"COLUMNS": "300"})
    assert again.exit_code == 1 and "already exists and is not empty" in again.output
    path.write_text(yaml.safe_dump({**job, "adapter": {"method": "lora"}}))
    refused = runner.invoke(app, ["autoconfig", str(path), "--output-dir", str(tmp_path / "o2")])
    assert refused.exit_code == 1 and "remove adapter" in refused.output


def test_autoconfig_refuses_a_gradient_rule_and_reads_exponent_numbers(tmp_path):
    """`selection:` (GAST) is refused naming the file and the key: the search's probes freeze and
    switch units, which a rule making the gradients itself does not expect; `5e-1` is a number."""
    from splice.selection.autoconfig import read_autoconfig

    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in sentiment_rows(8, 1)))
    path = tmp_path / "job.yaml"
    path.write_text(f"model: toy\ndata: {data}\nselection: {{name: gast}}\nsea_peft:\n  budget: 100\n")
    with pytest.raises(ConfigError, match=f"{path}: remove selection") as err:
        read_autoconfig(path)
    assert err.value.key == "selection"
    path.write_text(f"model: toy\ndata: {data}\nsea_peft:\n  budget: 100\n  uncertainty_weight: 5e-1\n")
    assert read_autoconfig(path)[1].uncertainty_weight == 0.5


def test_autoconfig_force_empties_the_folder_it_holds(tmp_path, monkeypatch):
    """--force empties an old output folder (a finished run inside it included) and holds it
    locked while it works; what it wrote before the search is gone."""
    import splice.selection.autoconfig as autoconfig_module
    from splice.train.report import claim_run_dir

    seen = {}

    def search(*args, **kwargs):
        seen["files"] = sorted(p.name for p in out.iterdir())
        with pytest.raises(splice.SpliceError, match="in use by another training run"):
            claim_run_dir(out)
        raise RuntimeError("stop here")

    monkeypatch.setattr(autoconfig_module, "search", search)
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in sentiment_rows(8, 1)))
    path = tmp_path / "job.yaml"
    path.write_text(f"model: toy\ndata: {data}\nsea_peft:\n  budget: 1000\n")
    out = tmp_path / "out"
    with claim_run_dir(out / "finetune"):  # a finished run: its lock given back below
        (out / "finetune" / "metrics.json").write_text("{}")
    (out / "sea_peft.json").write_text("{}")
    with pytest.raises(RuntimeError, match="stop here"):
        autoconfig_module.autoconfig(path, output_dir=out, force=True, console=Console(quiet=True))
    assert seen["files"] == [".splice-run.lock", "search"]
    assert sorted(p.name for p in out.iterdir()) == ["search"]  # the lock is given back
