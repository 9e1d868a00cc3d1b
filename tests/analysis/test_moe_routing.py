"""Routing of a MoELoRA over texts: the report against `routing_stats`, planted and uniform
routers, padding, the JSON, the heatmaps (and the spectra heatmap they share code with), and the
texts `splice analyze` routes."""

from __future__ import annotations

import json
import math

import pytest
import torch
from helpers import randomize, save_tiny_bert, save_tiny_llama
from PIL import Image
from transformers import AutoModel, AutoModelForCausalLM, AutoTokenizer

import splice
from splice.analysis import adapter_spectra
from splice.analysis import spectra_plots as plots
from splice.analysis.routing import (
    RoutingReport,
    adapter_routing,
    default_data,
    load_texts,
    plot_routing,
    routing_figure,
    row_text,
)
from splice.analysis.spectra_plots import layer_type_grid
from splice.core.errors import DataError, SpliceError
from splice.io.figures import pyplot
from splice.methods.moelora import MoELoRA, moe_adapters, routing_stats

TEXTS = ["a gripping film", "dull , overlong and predictable from start to end", "fine", "the cast shines",
         "one of the best films of the year , and one of the funniest"]
TARGETS = ["query", "value", "intermediate.dense"]
QUERY_0 = "encoder.layer.0.attention.self.query"


@pytest.fixture(scope="module")
def bert_folder(tmp_path_factory):
    return save_tiny_bert(tmp_path_factory.mktemp("tiny-bert"), dropout=0.0)


@pytest.fixture
def tokenizer(bert_folder):
    return AutoTokenizer.from_pretrained(bert_folder)


def bert_with_moe(folder, **config) -> torch.nn.Module:
    """The tiny BERT with a 4-expert, top-2 MoELoRA on TARGETS (random routers unless changed)."""
    model = AutoModel.from_pretrained(folder)
    splice.attach(model, MoELoRA(experts=4, top_k=2, r=4, targets=TARGETS, **config))
    return model


def heatmaps(report: RoutingReport) -> list:
    """The two heatmap axes of `routing_figure` (left: entropy, right: top share); the figure is closed."""
    fig = routing_figure(report)
    pyplot().close(fig)
    return [ax for ax in fig.axes if ax.images]


def test_the_heatmap_cells_are_the_numbers_routing_stats_gives(bert_folder, tokenizer):
    model = bert_with_moe(bert_folder)
    report = adapter_routing(model, tokenizer, TEXTS, batch_size=2)
    stats = routing_stats(model)  # the run's statistics, read raw
    assert [m.name for m in report.modules] == list(stats) and not report.unrouted
    entropy_ax, share_ax = heatmaps(report)
    columns = [f"encoder.layer.N.{t}" for t in ("attention.self.query", "attention.self.value", "intermediate.dense")]
    expected_entropy = torch.full((2, 3), float("nan"))
    expected_share = torch.full((2, 3), float("nan"))
    for name, s in stats.items():
        layer, column = int(name.split(".")[2]), columns.index(".".join(["encoder.layer.N", *name.split(".")[3:]]))
        expected_entropy[layer, column] = s["entropy"] / s["max_entropy"]
        expected_share[layer, column] = s["top_share"]
        module = next(m for m in report.modules if m.name == name)
        assert (module.tokens, list(module.utilisation), module.experts) == (s["tokens"], s["utilisation"], 4)
    for ax, expected, vmax in ((entropy_ax, expected_entropy, 1.0), (share_ax, expected_share, 0.5)):
        drawn = torch.tensor(ax.images[0].get_array().data)
        torch.testing.assert_close(drawn, expected, rtol=1e-6, atol=0)
        assert [t.get_text() for t in ax.texts] == [f"{v:.2f}" for v in expected.flatten().tolist()]
        assert ax.images[0].get_clim() == (0, vmax)
        assert [t.get_text() for t in ax.get_yticklabels()] == ["0", "1"]
    assert [t.get_text() for t in entropy_ax.get_xticklabels()] == ["attention.self.query", "attention.self.value",
                                                                  "intermediate.dense"]
    assert expected_entropy.unique().numel() == 6  # random routers: six different cells to place


def test_a_planted_router_gives_top_share_half_and_entropy_zero_and_a_zero_router_entropy_one(bert_folder,
                                                                                             tokenizer):
    model = bert_with_moe(bert_folder)
    with torch.no_grad():
        model.embeddings.LayerNorm.weight[0] = 0.0
        model.embeddings.LayerNorm.bias[0] = 10.0  # x[0] = 10 for every token entering layer 0
        for _, adapter in moe_adapters(model)[1].items():
            adapter.router.zero_()  # uniform probabilities: entropy log E exactly
        model.encoder.layer[0].attention.self.query.splice["default"].router[1, 0] = 5.0  # logit 50 for expert 1
    report = adapter_routing(model, tokenizer, TEXTS)
    for m in report.modules:
        if m.name == QUERY_0:
            assert m.top_share == pytest.approx(0.5) and m.utilisation[1] == pytest.approx(0.5)  # 1 of 2 slots
            assert m.normalised_entropy < 1e-12
        else:
            assert m.normalised_entropy == pytest.approx(1.0, abs=1e-6)
            assert m.entropy == pytest.approx(math.log(4), abs=1e-6)
    drawn = torch.tensor(heatmaps(report)[0].images[0].get_array().data)
    assert drawn[0, 0] < 1e-6 and torch.allclose(drawn.flatten()[1:], torch.ones(5), atol=1e-6)


def test_padding_is_not_routed_and_batching_changes_no_statistic(bert_folder, tokenizer):
    model = bert_with_moe(bert_folder)
    one = adapter_routing(model, tokenizer, TEXTS, batch_size=1)
    padded = adapter_routing(model, tokenizer, TEXTS, batch_size=5)  # stats reset: not 2x the tokens
    tokens = sum(len(ids) for ids in tokenizer(TEXTS)["input_ids"])
    assert all(m.tokens == tokens for m in one.modules + padded.modules)
    for a, b in zip(one.modules, padded.modules, strict=True):
        assert a.utilisation == pytest.approx(b.utilisation) and a.entropy == pytest.approx(b.entropy, rel=1e-5)


def test_the_model_runs_in_eval_mode_without_gradients_and_keeps_its_mode(bert_folder, tokenizer):
    model = bert_with_moe(bert_folder, aux_loss=1.0).train()
    seen = []
    model.register_forward_hook(lambda module, args, out: seen.append((module.training,
                                                                       torch.is_inference_mode_enabled())))
    adapter_routing(model, tokenizer, TEXTS, batch_size=2)
    assert seen == [(False, True)] * 3 and model.training
    assert splice.auxiliary_loss(model) is None  # no balancing loss out of eval mode


def test_a_decoder_tokenizer_without_pad_token_pads_with_eos_meanwhile(tmp_path):
    folder = save_tiny_llama(tmp_path / "llama")
    model = AutoModelForCausalLM.from_pretrained(folder)
    splice.attach(model, MoELoRA(experts=2, top_k=1, r=2, targets=["q_proj", "down_proj"]), "moe")
    tokenizer = AutoTokenizer.from_pretrained(folder)
    tokenizer.pad_token = None
    rows = [{"prompt": "Question: 2 + 2?\nAnswer:", "completion": " 4"}, {"prompt": "Question: 10 - 3?\nAnswer:"}]
    report = adapter_routing(model, tokenizer, rows)
    assert tokenizer.pad_token is None and report.adapter == "moe" and report.top_k == 1
    assert [m.module_type for m in report.modules[:2]] == ["model.layers.N.self_attn.q_proj",
                                                           "model.layers.N.mlp.down_proj"]
    tokens = sum(len(ids) for ids in tokenizer([row_text(r) for r in rows])["input_ids"])
    assert all(m.tokens == tokens and m.top_share == pytest.approx(max(m.utilisation)) for m in report.modules)


def test_the_report_round_trips_through_json_and_the_png_is_valid(bert_folder, tokenizer, tmp_path):
    model = bert_with_moe(bert_folder)
    randomize(model, scale=0.3)
    report = adapter_routing(model, tokenizer, TEXTS)
    written = json.loads(json.dumps(report.to_dict()))
    assert RoutingReport.from_dict(written) == report
    row = written["modules"][0]
    assert (row["layer"], row["type"], row["experts"]) == (0, "encoder.layer.N.attention.self.query", 4)
    assert row["normalised_entropy"] == pytest.approx(row["entropy"] / math.log(4))
    summary = written["summary"]
    assert summary["modules"] == 6 and summary["tokens"] == report.modules[0].tokens
    assert summary["top_share"]["max"] == max(m.top_share for m in report.modules)
    path = plot_routing(report, tmp_path / "routing.png")
    with Image.open(path) as image:
        assert image.format == "PNG" and image.size[0] > image.size[1] > 50
        image.verify()


def test_refusals(bert_folder, tokenizer):
    model = AutoModel.from_pretrained(bert_folder)
    with pytest.raises(SpliceError, match="0 MoELoRA adapters"):
        adapter_routing(model, tokenizer, TEXTS)
    splice.attach(model, MoELoRA(experts=2, top_k=1, r=2, targets=["query"]), "moe")
    splice.attach(model, splice.LoRA(r=2, targets=["query"]), "lora")  # now the only active one
    with pytest.raises(SpliceError, match="'moe' is not active"):
        adapter_routing(model, tokenizer, TEXTS, "moe")
    splice.activate(model, "moe")
    with pytest.raises(SpliceError, match="no texts"):
        adapter_routing(model, tokenizer, [])
    with pytest.raises(DataError, match="'text' or a 'prompt' column.*'review'"):
        adapter_routing(model, tokenizer, [{"review": "great"}])


def test_the_texts_splice_analyze_routes(tmp_path, bert_folder):
    assert load_texts("rotten_tomatoes", 3) == [r["text"] for r in splice.assets.dataset("rotten_tomatoes").test[:3]]
    arithmetic = splice.assets.dataset("arithmetic").test[0]
    assert load_texts("arithmetic", 1) == [arithmetic["prompt"] + arithmetic["completion"]]
    path = tmp_path / "rows.jsonl"
    path.write_text('{"text": "one"}\n{"prompt": "two", "completion": " three"}\n')
    assert load_texts(path, 10) == ["one", "two three"]
    with pytest.raises(DataError, match="does not exist"):
        load_texts(tmp_path / "missing.jsonl")
    with pytest.raises(SpliceError, match="rows must be >= 1"):
        load_texts(path, 0)
    assert default_data("classification", "unused") == "rotten_tomatoes"
    assert default_data("causal_lm", "unused") == "arithmetic"
    assert default_data("base", str(bert_folder)) == "rotten_tomatoes"  # an encoder's bare model


# -- the layers x module types heatmap both analyses draw -----------------------------------------


def test_the_grid_orders_layers_and_types_and_leaves_missing_cells_empty():
    grid = layer_type_grid([(1, "b", 1.0), (0, "a", 2.0), (None, "pool", 3.0), (1, "a", 4.0)])
    assert grid.layers == [0, 1, None] and grid.types == ["b", "a", "pool"]
    expected = torch.tensor([[math.nan, 2.0, math.nan], [1.0, 4.0, math.nan], [math.nan, math.nan, 3.0]])
    torch.testing.assert_close(grid.values, expected, equal_nan=True)


def test_the_effective_rank_heatmap_still_draws_the_spectra(monkeypatch, tmp_path):
    from helpers import make_bert

    bert = make_bert()
    splice.attach(bert, splice.LoRA(r=2, targets=["query", "value"]))
    randomize(bert)
    report = adapter_spectra(bert)
    saved = []
    monkeypatch.setattr(plots, "save_png", lambda fig, path: saved.append(fig))
    plots.plot_effective_ranks(report, tmp_path / "ranks.png")
    (ax,) = [ax for ax in saved[0].axes if ax.images]
    pyplot().close(saved[0])
    ranks = torch.tensor([m.entropy_rank for m in report.modules]).view(2, 2)  # layers x (query, value)
    torch.testing.assert_close(torch.tensor(ax.images[0].get_array().data), ranks, rtol=1e-6, atol=0)
    assert [t.get_text() for t in ax.texts] == [f"{v:.1f}" for v in ranks.flatten().tolist()]
    assert ax.images[0].get_clim() == (0, 2) and ax.get_title() == "effective rank (entropy), r = 2"
    assert [t.get_text() for t in ax.get_xticklabels()] == ["query", "value"]
