"""4-bit NF4 bases (QLoRA): quantize, attach, train, save and load, merge refusal and the way back.

Both libraries are tried: torchao's NF4 tensor and bitsandbytes' Linear4bit (its CPU backend).
"""

from __future__ import annotations

import copy

import pytest
import torch
from helpers import assert_close, llama_for, lm_training_losses, make_gpt2, make_llama, randomize
from torch import nn

import splice
from splice.core.errors import MergeError, SpliceError, TargetError
from splice.core.host import host_of, hosts
from splice.core.nf4_layers import NF4Linear, NF4Settings, dense_4bit, is_4bit_layer, quantize_layer, storage_bytes

BACKENDS = ["torchao", "bitsandbytes"]


@pytest.fixture(params=BACKENDS)
def backend(request) -> str:
    return request.param


def quantized_llama(backend: str, seed: int = 0, **options) -> nn.Module:
    return splice.quantize(llama_for(backend, seed), "nf4", backend=backend, **options)


def linear_names(model: nn.Module) -> set[str]:
    return {n for n, m in model.named_modules() if isinstance(m, nn.Linear)}


def test_every_linear_but_the_head_becomes_4bit_and_outputs_stay_close(backend, ids):
    model = llama_for(backend)
    with torch.no_grad():
        dense = model(ids).logits
    splice.quantize(model, "nf4", backend=backend)
    layers = splice.quantized_layers(model)
    assert set(layers) == linear_names(model) - {"lm_head"}  # the output head stays dense
    assert not is_4bit_layer(model.lm_head)
    assert all(s.backend == backend and s.block_size == 64 and s.double_quant for s in layers.values())
    with torch.no_grad():
        quantized = model(ids).logits
    error = ((quantized - dense).norm() / dense.norm()).item()
    assert 1e-4 < error < 0.2  # changed by 4-bit rounding, not broken


def test_nf4_code_book_and_its_error_against_int4(backend):
    """Spec (volume-1 §15 d1-d2): 16 levels in [-1, 1] with an exact 0, spanning it; on N(0, 1)
    weights NF4's round trip beats symmetric int4 absmax at the same block size."""
    weight = torch.randn(256, 512, generator=torch.Generator().manual_seed(0))
    layer = quantize_layer(_linear(weight), NF4Settings(backend))
    if backend == "torchao":
        book = layer.weight.nf4.float()
    else:
        book = layer.weight.quant_state.code.float()
    assert book.numel() == 16 and (book == 0).any()
    assert book.min().item() == -1.0 and book.max().item() == 1.0
    nf4 = (dense_4bit(layer.weight).float() - weight).pow(2).mean()
    blocks = weight.reshape(-1, 64)
    scale = blocks.abs().amax(1, keepdim=True) / 7
    int4 = ((blocks / scale).round().clamp(-7, 7) * scale - blocks).pow(2).mean()
    assert nf4 < 0.85 * int4


def _linear(weight: torch.Tensor) -> nn.Linear:
    layer = nn.Linear(weight.shape[1], weight.shape[0], bias=False)
    with torch.no_grad():
        layer.weight.copy_(weight)
    return layer


def test_double_quantization_overhead_is_qloras(backend):
    """Spec (volume-1 §15 d3): about 8/64 + 32/(64*256) = 0.127 bits per weight on top of 4."""
    layer = quantize_layer(_linear(torch.randn(2048, 2048)), NF4Settings(backend))
    bits = 8 * storage_bytes(layer.weight) / (2048 * 2048)
    assert bits - 4 == pytest.approx(8 / 64 + 32 / (64 * 256), rel=0.02)


def test_lora_on_4bit_base_trains_only_the_adapter(backend, ids):
    """Spec (volume-1 §15 d4): the loss drops; no base weight gets a gradient or changes."""
    model = quantized_llama(backend)
    splice.attach(model, splice.LoRA(r=4, alpha=8, targets="all-linear"))
    codes = {n: b.weight.detach().clone() if backend == "bitsandbytes" else b.weight.quantized_data.clone()
             for n, b, _ in hosts(model)}
    losses = lm_training_losses(model, ids, steps=15)
    assert losses[-1] < losses[0] - 0.1
    for name, base, _ in hosts(model):
        assert base.weight.grad is None
        now = base.weight if backend == "bitsandbytes" else base.weight.quantized_data
        assert torch.equal(now, codes[name]), name
    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trained and all("lora_" in n for n in trained)


def test_adapter_on_4bit_base_equals_it_on_the_dequantized_base(backend, ids):
    """Output and gradients through the 4-bit layer are those of its dense weight (fp32 compute),
    so the host adds the adapter exactly as on any layer (the lean LoRA autograd included)."""
    model = quantized_llama(backend)
    splice.attach(model, splice.LoRA(r=4, alpha=8, targets="all-linear", dropout=0.1))
    randomize(model)
    dense = splice.dequantize(copy.deepcopy(model))
    assert not splice.quantized_layers(dense) and len(list(hosts(dense))) == len(list(hosts(model)))
    model.train()
    dense.train()
    grads = []
    for m in (model, dense):
        torch.manual_seed(5)  # the same dropout masks
        out = m(input_ids=ids, labels=ids)
        out.loss.backward()
        grads.append({n: p.grad for n, p in m.named_parameters() if p.grad is not None})
        m.zero_grad()
    assert grads[0].keys() == grads[1].keys() and grads[0]
    for name in grads[0]:
        assert_close(grads[0][name], grads[1][name], rel=1e-4)
    model.eval()
    dense.eval()
    with torch.no_grad():
        assert_close(model(ids).logits, dense(ids).logits, rel=1e-5)


def test_saved_adapter_loads_on_a_fresh_4bit_base_bit_for_bit(backend, ids, tmp_path):
    model = quantized_llama(backend)
    splice.attach(model, splice.LoRA(r=4, targets="all-linear"))
    randomize(model)
    splice.save(model, tmp_path / "adapter")
    fresh = splice.load(quantized_llama(backend), tmp_path / "adapter")
    with torch.no_grad():
        assert torch.equal(fresh(ids).logits, model(ids).logits)


def test_merge_is_refused_and_unload_dequantizes_exactly(backend, ids):
    model = quantized_llama(backend)
    splice.attach(model, splice.LoRA(r=4, targets="all-linear"))
    randomize(model)
    with torch.no_grad():
        expected = model(ids).logits
    with pytest.raises(MergeError, match=r"dequantize=True"):
        splice.merge(model)
    assert all(not host.merged for _, _, host in hosts(model))  # refused before anything changed
    plain = splice.unload(copy.deepcopy(model), dequantize=True)
    assert not list(hosts(plain)) and not splice.quantized_layers(plain)
    assert all(type(m) is nn.Linear and m.weight.dtype == torch.float32
               for n, m in plain.named_modules() if n in linear_names(model))
    with torch.no_grad():
        assert_close(plain(ids).logits, expected, rel=1e-5)


def test_unload_requantizes_on_request_and_reports_the_error(backend, ids):
    model = quantized_llama(backend)
    splice.attach(model, splice.LoRA(r=4, targets="all-linear"))
    randomize(model)
    exact = splice.unload(copy.deepcopy(model), dequantize=True)
    message = r"requantize: 14 merged layer\(s\) back in 4-bit.*of the merged adapter's change"
    with pytest.warns(UserWarning, match=message):
        again = splice.unload(model, dequantize=True, requantize=True)
    assert set(splice.quantized_layers(again)) == linear_names(again) - {"lm_head"}
    for name in splice.quantized_layers(again):  # each weight: NF4's rounding (~9%); a wrong layer or layout ~140%
        dense = exact.get_submodule(name).weight
        error = ((dense_4bit(again.get_submodule(name).weight).float() - dense).norm() / dense.norm()).item()
        assert 0 < error < 0.2, name
    with pytest.raises(SpliceError, match="requantize=True needs dequantize=True"):
        splice.unload(quantized_llama(backend), requantize=True)


def test_a_refused_merge_inside_unload_leaves_the_4bit_layers(ids):
    model = quantized_llama("torchao")
    splice.attach(model, splice.LoRA(r=4, targets="all-linear"))
    randomize(model)
    with torch.no_grad():
        expected = model(ids).logits
    adapter = model.model.layers[1].mlp.down_proj.splice["default"]
    kept = adapter.lora_A.detach().clone(), adapter.lora_B.detach().clone()
    with torch.no_grad():  # a delta that overflows fp32: the merge refuses it
        adapter.lora_A.fill_(1e30)
        adapter.lora_B.fill_(1e30)
    before = {n: m for n, m in model.named_modules() if is_4bit_layer(m)}
    with pytest.raises(MergeError, match="inf/nan"):
        splice.unload(model, dequantize=True)
    assert {n: m for n, m in model.named_modules() if is_4bit_layer(m)} == before  # the very same modules
    assert all(not host.merged and host_of(base) is host for _, base, host in hosts(model))
    with torch.no_grad():
        adapter.lora_A.copy_(kept[0])
        adapter.lora_B.copy_(kept[1])
        assert torch.equal(model(ids).logits, expected)


def test_route_mixes_adapters_per_row_on_a_4bit_base(backend, ids):
    model = quantized_llama(backend)
    splice.attach(model, splice.LoRA(r=4, targets="all-linear"), "a")
    splice.attach(model, splice.LoRA(r=2, targets=["q_proj", "v_proj"]), "b")
    randomize(model, "a", seed=1)
    randomize(model, "b", seed=2)
    expected = []
    with torch.no_grad():
        for row, name in enumerate(["a", "b"]):
            splice.activate(model, name)
            expected.append(model(ids[row: row + 1]).logits)
        with splice.route(model, ["a", "b"]):
            mixed = model(ids).logits
    assert_close(mixed, torch.cat(expected), rel=1e-5)


def test_gpt2_conv1d_layers_are_quantized_in_linear_layout(ids):
    model = make_gpt2()
    with torch.no_grad():
        dense = model(ids).logits
    splice.quantize(model, "nf4", backend="torchao")
    attention = model.transformer.h[0].attn.c_attn
    assert isinstance(attention, NF4Linear) and attention.weight.shape == (3 * 32, 32)
    with torch.no_grad():
        error = ((model(ids).logits - dense).norm() / dense.norm()).item()
    assert error < 0.2
    splice.attach(model, splice.LoRA(r=4, targets=["c_attn"]))
    randomize(model)
    with torch.no_grad():
        assert_close(model(ids).logits, splice.dequantize(copy.deepcopy(model))(ids).logits, rel=1e-5)


def test_deepcopy_and_dtype_moves_keep_the_codes(ids):
    model = quantized_llama("torchao")
    layer = model.model.layers[0].self_attn.q_proj
    copied = copy.deepcopy(layer)
    for name in layer.weight.__tensor_flatten__()[0]:
        assert torch.equal(getattr(copied.weight, name), getattr(layer.weight, name)), name
    half = copy.deepcopy(model).to(torch.bfloat16)
    moved = half.model.layers[0].self_attn.q_proj
    assert isinstance(moved, NF4Linear) and moved.weight.dtype == torch.bfloat16
    assert torch.equal(moved.weight.quantized_data, layer.weight.quantized_data)
    with torch.no_grad():
        assert half(ids).logits.dtype == torch.bfloat16


def test_compute_dtype_sets_the_dequantized_dtype_and_keeps_the_input_dtype():
    model = quantized_llama("torchao", compute_dtype="bfloat16")
    layer = model.model.layers[0].mlp.up_proj
    assert layer.weight.dtype == torch.bfloat16
    x = torch.randn(3, layer.in_features)
    out = layer(x)
    assert out.dtype == torch.float32
    expected = (x.bfloat16() @ dense_4bit(layer.weight).T).float()
    assert torch.equal(out, expected)


def test_bad_requests_are_refused_with_reasons():
    model = make_llama()
    with pytest.raises(SpliceError, match="scheme 'int3' is not supported"):
        splice.quantize(model, "int3")
    with pytest.raises(SpliceError, match="backend 'cuda4' is not one of"):
        splice.quantize(model, backend="cuda4")
    with pytest.raises(SpliceError, match="compute_dtype must be one of"):
        splice.quantize(model, compute_dtype="int8")
    with pytest.raises(TargetError, match=r"skip entries \['q_prj'\] match no Linear layer.*q_proj"):
        splice.quantize(model, skip=["q_prj"])
    with pytest.raises(SpliceError, match="torchao's NF4 always quantizes its block scales"):
        splice.quantize(model, backend="torchao", double_quant=False)
    assert not splice.quantized_layers(model)
    splice.attach(model, splice.LoRA(r=2, targets=["q_proj"]))
    with pytest.raises(SpliceError, match="quantize the base model before attaching adapters"):
        splice.quantize(model)


def test_skip_keeps_layers_dense_and_bitsandbytes_can_skip_double_quant():
    model = quantized_llama("bitsandbytes", skip=["down_proj"], double_quant=False)
    layers = splice.quantized_layers(model)
    assert not any(n.endswith("down_proj") for n in layers)
    assert all(not s.double_quant for s in layers.values())
    assert type(model.model.layers[0].mlp.down_proj) is nn.Linear


def test_a_layer_torchao_cannot_take_stays_dense_with_a_warning():
    model = nn.Sequential(nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 3))  # 24 weights: not a block of 64
    with pytest.warns(UserWarning, match=r"1 layer\(s\) stay dense: 2 \(24 weights are not a multiple"):
        splice.quantize(model, backend="torchao")
    assert isinstance(model[0], NF4Linear) and type(model[2]) is nn.Linear


def test_pissa_and_training_a_4bit_module_in_full_are_refused():
    with pytest.raises(SpliceError, match="lora init 'pissa' starts from part of the base weight .* quantized "
                                          "NF4Tensor of 'model.layers.0.self_attn.q_proj' cannot give up exactly"):
        splice.attach(quantized_llama("torchao"), splice.LoRA(r=2, targets=["q_proj"], init="pissa"))
    model = quantized_llama("bitsandbytes", keep_heads=False)  # torchao cannot take its 97 x 32 weights
    with pytest.raises(SpliceError, match="'lm_head' cannot be trained in full .* 4-bit layers"):
        splice.attach(model, splice.LoRA(r=2, targets=["q_proj"], train_also=["lm_head"]))


def test_base_bytes_counts_codes_and_scales(backend):
    model = llama_for(backend)
    dense = splice.base_bytes(model)
    assert dense["quantized_weights"] == 0 and dense["dense_linear_bytes"] == 4 * dense["dense_linear_weights"]
    splice.quantize(model, backend=backend)
    packed = splice.base_bytes(model)
    head = model.lm_head.weight.numel()
    assert packed["quantized_weights"] + head == dense["dense_linear_weights"]
    assert packed["dense_linear_weights"] == head  # the LM head stays dense
    assert packed["quantized_as_bf16_bytes"] == 2 * packed["quantized_weights"]
    assert 4 < packed["bits_per_weight"] < 16  # codes plus scales and code books, large on 512-weight layers
    assert packed["model_bytes"] < dense["model_bytes"]
    assert "14 Linear layers in 4-bit" in str(splice.summary(model))
    assert splice.summary(model).base == splice.summary(llama_for(backend)).base  # weights, not packed bytes


def test_a_backend_that_takes_no_layer_is_an_error():
    model = nn.Sequential(nn.Linear(8, 3))  # 24 weights: torchao needs a multiple of 64
    with pytest.raises(SpliceError, match=r"the torchao backend took none of the 1 layers: 0 \(24 weights"):
        splice.quantize(model, backend="torchao")
    assert type(model[0]) is nn.Linear


def test_dense_tensors_left_are_copied_out_of_the_loaded_files_map(tmp_path, ids):
    """transformers reads safetensors through a memory map that stays resident while any tensor
    from it lives; the tensors quantize leaves dense get memory of their own, values unchanged,
    tied weights still tied."""
    from transformers import LlamaForCausalLM

    make_llama().save_pretrained(tmp_path / "llama")
    model = LlamaForCausalLM.from_pretrained(tmp_path / "llama", dtype=torch.float32)
    mapped = {n: (p.untyped_storage().data_ptr(), p.detach().clone()) for n, p in model.named_parameters()
              if not n.endswith("_proj.weight")}
    splice.quantize(model, backend="torchao")
    for name, param in model.named_parameters():
        if name in mapped:
            assert param.untyped_storage().data_ptr() != mapped[name][0], name
            assert torch.equal(param, mapped[name][1]), name
