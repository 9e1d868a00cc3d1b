"""Review of adapter merging (`splice.merging`, `splice merge`) and PARA compression
(`splice.compression.para`, `splice compress`) against their docstrings, the specs and what an HF
PEFT user expects (`add_weighted_adapter` / `merge_and_unload`, rank_pattern / alpha_pattern).

The tests marked as bugs fail on the reviewed code for the reason in their docstring and pass
once it is fixed; the others pin behaviour that was checked and is right (GPT-2 Conv1D layouts,
DoRA and rsLoRA + lora_bias through save and HF PEFT, effective scales after compression, EMR on
conv and embedding layers, bf16 dtypes, refusals)."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from helpers import logits as outputs
from helpers import (
    make_bert,
    make_convnet,
    make_gpt2,
    make_llama,
    randomize,
    text_batch,
)
from transformers import BertForSequenceClassification
from typer.testing import CliRunner

import splice
from splice.core.errors import SpliceError
from splice.io.adapter_states import adapter_state
from splice.io.peft_format import attach_state
from splice.merging import fold_into_base, merge_adapters, unify_adapters

IDS = text_batch()["input_ids"]


def _trained(make, config: splice.AdapterConfig, seed: int) -> torch.nn.Module:
    model = splice.attach(make(), config)
    randomize(model, seed=seed, scale=0.3)
    return model


def _weights_after(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    merged = splice.unload(copy.deepcopy(model))
    return {k: v.detach().double() for k, v in merged.state_dict().items()}


def _change(model: torch.nn.Module, make) -> dict[str, torch.Tensor]:
    reference = {k: v.double() for k, v in make().state_dict().items()}
    return {k: v - reference[k] for k, v in _weights_after(model).items()}


def _image() -> torch.Tensor:
    return torch.randn(2, 3, 5, 5, generator=torch.Generator().manual_seed(1))


# -- bugs ------------------------------------------------------------------------------------


def test_dora_merged_with_a_conv_lora_is_refused_or_gives_a_loadable_adapter():
    """BUG (src/splice/merging/merge.py:114, :157 and :189-192): as soon as one input is DoRA
    (`dora = ... any(s.dora ...)`), `_exact` gives *every* merged module a DoRA magnitude,
    including modules that only a plain LoRA changes on a Conv (or Embedding) layer. splice
    itself refuses DoRA off Linear layers (src/splice/io/peft_format.py:274-275, "DoRA on conv layers
    is not supported"), so `merge_adapters` returns, and `save` writes, an adapter that cannot be
    loaded anywhere in splice. Expected: refuse such a merge up front with a SpliceError (or keep
    the non-Linear modules loadable), never hand back an adapter its own loader rejects.
    """
    dora = _trained(make_convnet, splice.DoRA(r=2, targets=["head"]), 1)
    lora = _trained(make_convnet, splice.LoRA(r=2, targets=["conv1", "head"]), 2)
    try:
        result = merge_adapters([dora, lora], "linear", weights=[1.0, 1.0], base=make_convnet())
    except SpliceError:
        return  # refused with the reason: fine
    merged = attach_state(make_convnet(), result.state)  # AdapterFileError on the reviewed code
    changes = [_change(m, make_convnet) for m in (dora, lora)]
    got = _change(merged, make_convnet)
    for key in ("conv1.weight", "head.weight"):
        torch.testing.assert_close(got[key], changes[0][key] + changes[1][key], atol=1e-5, rtol=1e-5)


@pytest.fixture
def tiny_bert_folder(tmp_path):
    folder = tmp_path / "tiny-bert"
    make_bert().save_pretrained(folder)
    return folder


def test_cli_merge_one_adapter_into_base_does_not_ignore_svd_rank(tiny_bert_folder, tmp_path):
    """BUG (src/splice/cli/adapter_cmds.py:203-205): `splice merge A --method svd --rank 1` is an
    accepted one-adapter request (line 196 lets svd through: truncate A to rank 1), but adding
    `--into-base` takes the `_fold_one` shortcut, which folds the *whole* adapter and silently drops
    --method, --rank and --weights. The saved model is not the rank-1 truncation that was asked
    for. Expected: fold the result of `merge_adapters([A], "svd", rank=1)` (as the several-adapter
    path does via `_fold_merged`), or refuse --method/--rank/--weights with --into-base for one
    adapter.
    """
    from splice.cli.main import app

    model = BertForSequenceClassification.from_pretrained(tiny_bert_folder).eval()
    splice.attach(model, splice.LoRA(r=3, targets=["query", "value"], train_also=["classifier"]))
    randomize(model, seed=4)
    adapter = splice.save(model, tmp_path / "adapter")
    out = tmp_path / "folded"
    result = CliRunner().invoke(app, ["merge", str(adapter), "--method", "svd", "--rank", "1", "--into-base",
                                      "--model", str(tiny_bert_folder), "--out", str(out)])
    if result.exit_code != 0:
        assert "rank" in result.output or "method" in result.output, result.output  # refused with the reason
        return
    base = BertForSequenceClassification.from_pretrained(tiny_bert_folder).state_dict()
    folded = BertForSequenceClassification.from_pretrained(out).state_dict()
    key = "bert.encoder.layer.0.attention.self.query.weight"
    delta = (folded[key] - base[key]).double()
    singular = torch.linalg.svdvals(delta)
    assert singular[1] <= 1e-6 * singular[0], f"folded change has rank > 1: singular values {singular[:3]}"


# -- verified behaviour ----------------------------------------------------------------------


def test_gpt2_conv1d_merge_is_the_weighted_sum_and_peft_save_fold_all_agree(tmp_path):
    """GPT-2's Conv1D (fan_in_fan_out) layers: a linear merge is Σ w_i ΔW_i in the model's own
    layout, the saved folder loads in HF PEFT with the same outputs, and folding it into the base
    gives the adapter's forward."""
    from peft import PeftModel

    first = _trained(make_gpt2, splice.LoRA(r=2, alpha=4, targets=["c_attn", "c_fc"]), 1)
    second = _trained(make_gpt2, splice.LoRA(r=3, alpha=3, rslora=True, targets=["c_attn", "c_fc"]), 2)
    weights = [0.7, -0.4]
    result = merge_adapters([first, second], "linear", weights=weights)
    merged = attach_state(make_gpt2(), result.state)
    got, changes = _change(merged, make_gpt2), [_change(m, make_gpt2) for m in (first, second)]
    for key in ("transformer.h.0.attn.c_attn.weight", "transformer.h.1.mlp.c_fc.weight"):
        torch.testing.assert_close(got[key], weights[0] * changes[0][key] + weights[1] * changes[1][key],
                                   atol=1e-6, rtol=1e-5)
    path = result.save(tmp_path / "merged")
    assert json.loads((path / "adapter_config.json").read_text())["fan_in_fan_out"] is True
    expected = outputs(merged, IDS)
    torch.testing.assert_close(outputs(PeftModel.from_pretrained(make_gpt2(), str(path)), IDS), expected,
                               atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(outputs(fold_into_base(make_gpt2(), path), IDS), expected, atol=1e-5, rtol=1e-5)


def test_dora_merge_with_per_module_ranks_loads_in_peft_alike(tmp_path):
    """A DoRA merge of adapters with different ranks, alphas and rsLoRA is written with
    rank_pattern/alpha_pattern and use_dora; HF PEFT reproduces splice's outputs."""
    from peft import PeftModel

    a = _trained(make_llama, splice.DoRA(r=4, alpha=8, targets=["q_proj", "v_proj", "up_proj"],
                                         rank_pattern={"v_proj": 2}), 1)
    b = _trained(make_llama, splice.DoRA(r=3, alpha=3, rslora=True, targets=["q_proj", "v_proj"]), 2)
    result = merge_adapters([a, b], "linear", weights=[0.6, 0.7], base=make_llama())
    path = result.save(tmp_path / "merged")
    config = json.loads((path / "adapter_config.json").read_text())
    assert config["use_dora"] and config["rank_pattern"]
    ours = attach_state(make_llama(), result.state)
    torch.testing.assert_close(outputs(PeftModel.from_pretrained(make_llama(), str(path)), IDS), outputs(ours, IDS),
                               atol=1e-5, rtol=1e-5)


def test_para_keeps_the_effective_scale_of_rslora_with_lora_bias_through_peft(tmp_path):
    """PARA rewrites every module at scale 1 (alpha = r per module, rsLoRA off) and rescales the
    lora_B bias by the old scale: at τ = 0 the outputs are the original's, and a budget cut with
    per-module ranks loads in HF PEFT and in splice with the in-memory outputs."""
    from peft import PeftModel

    from splice.compression import compress

    model = _trained(make_bert, splice.LoRA(r=4, alpha=8, rslora=True, lora_bias=True,
                                            targets=["query", "value", "dense"]), 3)
    exact = compress(model, threshold=0.0)
    torch.testing.assert_close(outputs(attach_state(make_bert(), exact.state), IDS), outputs(model, IDS),
                               atol=1e-5, rtol=1e-5)
    cut = compress(model, budget=0.4, out=tmp_path / "cut")
    config = json.loads((tmp_path / "cut" / "adapter_config.json").read_text())
    assert config["use_rslora"] is False and config["rank_pattern"] == config["alpha_pattern"]
    expected = outputs(attach_state(make_bert(), cut.state), IDS)
    torch.testing.assert_close(outputs(PeftModel.from_pretrained(make_bert(), str(tmp_path / "cut")), IDS), expected,
                               atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(outputs(splice.load(make_bert(), tmp_path / "cut"), IDS), expected)


def test_emr_and_elementwise_rules_on_conv_and_embedding_layers_are_exact_for_one_task():
    """Conv1d/Conv2d/Embedding layouts: one task unified then decoupled is the task itself, and
    TIES at density 1 and full rank on one task is the task itself."""
    model = _trained(make_convnet, splice.LoRA(r=2, targets=["embed", "conv1", "conv2", "head"]), 6)
    image = _image()
    expected = outputs(model, IDS[:2], image)
    rebuilt = unify_adapters([model]).decouple(0)
    torch.testing.assert_close(outputs(attach_state(make_convnet(), rebuilt), IDS[:2], image), expected,
                               atol=1e-5, rtol=1e-4)
    ties = merge_adapters([model], "ties", weights=[1.0], density=1.0, rank=8)
    torch.testing.assert_close(outputs(attach_state(make_convnet(), ties.state), IDS[:2], image), expected,
                               atol=1e-5, rtol=1e-4)


def test_bf16_adapters_merge_compress_and_unify_in_bf16():
    """bf16 inputs give bf16 factors (the sums are taken in float64, then cast), never fp32."""
    from splice.compression import compress

    a = _trained(make_llama, splice.LoRA(r=4, targets=["q_proj", "v_proj"]), 4).to(torch.bfloat16)
    b = _trained(make_llama, splice.LoRA(r=4, targets=["q_proj", "v_proj"]), 5).to(torch.bfloat16)
    name = "model.layers.0.self_attn.q_proj"
    assert adapter_state(a).modules[name].A.dtype == torch.bfloat16
    for state in (merge_adapters([a, b], "linear").state, merge_adapters([a, b], "ties").state,
                  compress(a, budget=0.5).state, unify_adapters([a, b]).decouple(0)):
        assert state.modules[name].A.dtype == state.modules[name].B.dtype == torch.bfloat16


@pytest.mark.parametrize("method", ["ties", "dare_ties", "dare_linear", "magnitude_prune"])
@pytest.mark.parametrize("density", [-0.5, 1.5])
def test_elementwise_merges_refuse_a_density_outside_0_1(method, density):
    a = _trained(make_llama, splice.LoRA(r=2, targets=["q_proj"]), 1)
    b = _trained(make_llama, splice.LoRA(r=2, targets=["q_proj"]), 2)
    with pytest.raises(SpliceError, match="density"):
        merge_adapters([a, b], method, density=density)
