"""Review of the QLoRA change (4-bit NF4 bases): each test fails on the reviewed code for a bug."""

from __future__ import annotations

import warnings

import pytest
import torch
from helpers import llama_for, make_gpt2, make_llama, randomize
from transformers import RobertaConfig, RobertaForSequenceClassification

import splice
from splice.core.errors import MergeError, SpliceError
from splice.core.nf4_layers import dense_4bit, is_4bit_layer
from splice.core.quantization import quantize_options


def test_unload_dequantize_gives_gpt2_back_its_conv1d_layout(ids):
    """`unload(dequantize=True)` promises "the plain model", but on GPT-2 every Conv1D comes back
    as an nn.Linear with the weight in [out, in] layout: the model's state_dict (and so
    `save_pretrained`) no longer loads into GPT2LMHeadModel (size mismatch on c_attn/c_fc), and
    the square c_proj weights would load silently transposed."""
    model = splice.quantize(make_gpt2(), backend="torchao")
    splice.attach(model, splice.LoRA(r=2, targets=["c_attn"]))
    randomize(model)
    plain = splice.unload(model, dequantize=True)
    fresh = make_gpt2(seed=1)
    fresh.load_state_dict(plain.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(fresh(ids).logits, plain(ids).logits)


@pytest.mark.parametrize("backend", ["torchao", "bitsandbytes"])
def test_unload_dequantize_on_a_bf16_model_still_runs(backend, ids):
    """On a bf16 model, `unload(dequantize=True)` always dequantizes to fp32 (no dtype option) while
    the rest of the model (embeddings, norms, the LM head) stays bf16: the returned model crashes on
    its first forward ("expected m1 and m2 to have the same dtype")."""
    model = splice.quantize(llama_for(backend).to(torch.bfloat16), backend=backend)
    splice.attach(model, splice.LoRA(r=2, targets="all-linear"))
    with torch.no_grad():
        model(ids)
        plain = splice.unload(model, dequantize=True)
        plain(ids)


@pytest.mark.parametrize("backend", ["torchao", "bitsandbytes"])
def test_requantize_keeps_layers_without_a_merged_adapter_bit_for_bit(backend):
    """`unload(dequantize=True, requantize=True)` dequantizes and quantizes again every 4-bit layer,
    also those that held no adapter and so did not change: NF4 is not idempotent on its own
    dequantized weights (the scales are quantized again), so untouched layers lose precision for
    nothing. They should keep their original 4-bit codes."""
    model = splice.quantize(llama_for(backend), backend=backend)
    before = {n: dense_4bit(m.weight).clone() for n, m in model.named_modules() if is_4bit_layer(m)}
    splice.attach(model, splice.LoRA(r=2, targets=["q_proj"]))
    randomize(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        splice.unload(model, dequantize=True, requantize=True)
    for name, dense in before.items():
        if not name.endswith("q_proj"):
            assert torch.equal(dense_4bit(model.get_submodule(name).weight), dense), name


def test_requantize_report_counts_only_merged_layers_and_is_finite():
    """The requantize warning divides each layer's rounding by its merged change; the layers that
    held no adapter have a zero change, so the report says "inf% (median; worst inf%)" and "14
    merged layer(s)" when only the 4 q_proj/v_proj layers took a merge."""
    model = splice.quantize(make_llama(), backend="torchao")
    splice.attach(model, splice.LoRA(r=2, targets=["q_proj", "v_proj"]))
    randomize(model, scale=0.05)
    with pytest.warns(UserWarning, match="requantize") as record:
        splice.unload(model, dequantize=True, requantize=True)
    message = str(record[-1].message)
    assert "inf%" not in message, message
    assert message.startswith("requantize: 4 merged layer(s)"), message


def _tiny_roberta() -> RobertaForSequenceClassification:
    torch.manual_seed(0)
    config = RobertaConfig(vocab_size=97, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                           intermediate_size=64, max_position_embeddings=70, num_labels=2)
    return RobertaForSequenceClassification(config).eval()


def test_keep_heads_keeps_a_roberta_classification_head_dense():
    """`keep_heads=True` (the default) should keep the sequence classifier's head dense. RoBERTa's
    `classifier` is a module holding two Linears (dense, out_proj); `_pick` only excludes the head's
    own name, so both are quantized, and the training task's `train_also=["classifier"]` is then
    refused with advice to pass keep_heads=True, which was already on."""
    model = splice.quantize(_tiny_roberta(), backend="torchao")
    assert not [n for n in splice.quantized_layers(model) if n.startswith("classifier")]
    splice.attach(model, splice.LoRA(r=2, targets=["query", "value"], train_also=["classifier"]))


def test_dora_reads_the_dequantized_base_after_dequantize(ids, tmp_path):
    """DoRA keeps a reference to its base layer (`DoRAAdapter._base`) to read the weight for its
    norms; `Host.move_to` (dequantize, requantize, the rollback of `dequantized`) does not rebind
    it, so after `splice.dequantize` DoRA still reads the old NF4Linear, which is no longer in the
    model (and keeps it alive). A change to the dense base weight (training it, loading a state
    dict, moving it to another device) is then ignored by DoRA's magnitude ratio."""
    model = splice.quantize(make_llama(), backend="torchao")
    splice.attach(model, splice.DoRA(r=2, targets=["q_proj"]))
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.01)
    splice.save(model, tmp_path / "adapter")
    splice.dequantize(model)
    reference = splice.load(splice.dequantize(splice.quantize(make_llama(), backend="torchao")), tmp_path / "adapter")
    with torch.no_grad():
        for m in (model, reference):
            m.model.layers[0].self_attn.q_proj.weight.mul_(0.5)  # the dense base changes after dequantize
        torch.testing.assert_close(model(ids).logits, reference(ids).logits, rtol=1e-5, atol=1e-6)


def test_goat_on_a_4bit_base_is_refused_with_a_reason_that_fits():
    """GOAT (MoELoRA init="goat") takes part of the base weight at attach, like PiSSA; PiSSA got a
    clear refusal, GOAT did not: attach fails deep in `Host.take_initial` with a MergeError telling
    the user to "Use splice.unload(model, dequantize=True)", advice about merging that makes no
    sense while attaching (unload would drop every adapter)."""
    model = splice.quantize(make_llama(), backend="torchao")
    with pytest.raises(SpliceError) as caught:
        splice.attach(model, splice.MoELoRA(r=4, experts=2, init="goat", targets=["q_proj"]))
    assert not isinstance(caught.value, MergeError), caught.value
    assert "unload" not in str(caught.value), caught.value


def test_quantize_options_refuses_a_skip_that_cannot_work():
    """`quantize_options` promises "a SpliceError naming the key and value that cannot work" and is
    what TrainConfig validates `quantize` with, but it does not check `skip`: {skip: 5} passes the
    config check and the run crashes later in `splice.quantize` with "TypeError: 'int' object is
    not iterable"."""
    with pytest.raises(SpliceError, match="skip"):
        quantize_options({"scheme": "nf4", "skip": 5})
    with pytest.raises(SpliceError, match="skip"):
        splice.quantize(make_llama(), skip=5)
