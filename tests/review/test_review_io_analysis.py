"""Adversarial review of adapter file I/O (`splice.io`) and the diagnostics (`splice.analysis`):
each test here fails on the reviewed code for the reason its docstring states, and passes once
that is fixed. HF PEFT 0.21.2 (installed) is the reference for the file format and outputs."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from helpers import VOCAB, make_gpt2, make_llama, randomize
from peft import LoraConfig, get_peft_model
from torch import nn

import splice
from splice.analysis import adapter_spectra, compare_deltas, fit_forgetting_law, principal_angles
from splice.core.errors import AdapterFileError, SpliceError

ATOL = 1e-5


def _logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits.detach().clone()


def _ids(rows: int = 3, length: int = 7, vocab: int = VOCAB) -> torch.Tensor:
    return torch.randint(1, vocab, (rows, length), generator=torch.Generator().manual_seed(1))


def _randomize_peft(peft_model: nn.Module, scale: float = 0.3, seed: int = 1) -> None:
    """Random non-zero values for PEFT's adapter "default": its LoRA factors and its copies of
    modules_to_save (never the originals)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if ("lora_" in name or ".modules_to_save." in name) and ".default" in name:
                p.copy_(torch.randn(p.shape, generator=g) * scale)


# -- io.peft_format: PEFT files splice must read -------------------------------------------------


def test_peft_tied_lm_head_in_modules_to_save_loads(tmp_path: Path) -> None:
    """Bug: a GPT-2 (tied wte/lm_head) adapter with modules_to_save=["lm_head"] is refused with
    "adapter holds 'lm_head.weight' (modules_to_save) but the model has no such tensor": the
    check builds its name table from `named_parameters()`, which drops the tied alias. PEFT
    saves and loads this file fine, and splice cannot even load its own save of it."""
    peft_model = get_peft_model(make_gpt2(), LoraConfig(r=2, lora_alpha=4, target_modules=["c_attn"],
                                                        fan_in_fan_out=True, modules_to_save=["lm_head"]))
    _randomize_peft(peft_model)
    peft_model.eval()
    ids = _ids()
    expected = _logits(peft_model, ids)
    peft_model.save_pretrained(str(tmp_path / "peft"))

    model = make_gpt2()
    splice.load(model, tmp_path / "peft")
    torch.testing.assert_close(_logits(model, ids), expected, atol=ATOL, rtol=0)

    # and splice's own save of the same adapter round-trips
    splice.save(model, tmp_path / "again")
    reloaded = make_gpt2()
    splice.load(reloaded, tmp_path / "again")
    torch.testing.assert_close(_logits(reloaded, ids), expected, atol=ATOL, rtol=0)


def _gemma3() -> nn.Module:
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    torch.manual_seed(0)
    config = Gemma3TextConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=32, num_hidden_layers=1,
                              num_attention_heads=2, num_key_value_heads=1, head_dim=32,
                              max_position_embeddings=32, sliding_window=16)
    return Gemma3ForCausalLM(config).eval()


def test_peft_scaled_embedding_lora_matches_peft_outputs(tmp_path: Path) -> None:
    """Bug: on a scaled embedding (Gemma3TextScaledWordEmbedding, BART's ScaledWordEmbedding:
    forward = embedding(x) * embed_scale) PEFT multiplies the LoRA delta by `embed_scale` too;
    splice adds it unscaled. A PEFT Gemma-3 adapter on embed_tokens loads in splice with logits
    off by ~0.65 (of a 0.76 change), and splice's merge disagrees with its own unmerged output."""
    assert float(_gemma3().model.embed_tokens.embed_scale) == 8.0  # sqrt(hidden): the case at hand
    peft_model = get_peft_model(_gemma3(), LoraConfig(r=4, lora_alpha=8, target_modules=["embed_tokens"]))
    _randomize_peft(peft_model)
    peft_model.eval()
    ids = _ids()
    expected = _logits(peft_model, ids)
    assert (expected - _logits(_gemma3(), ids)).abs().max() > 1e-2
    peft_model.save_pretrained(str(tmp_path))

    model = _gemma3()
    splice.load(model, tmp_path)
    torch.testing.assert_close(_logits(model, ids), expected, atol=ATOL, rtol=0)


def test_peft_lora_ga_saved_without_conversion_is_refused(tmp_path: Path) -> None:
    """Bug: init_lora_weights="lora_ga" changed the base weights at init (W - s*B0@A0, PEFT's
    `lora_ga_init`; PEFT lists LoRA-GA with PiSSA/CorDA/OLoRA as base-modifying), so a file
    saved without `path_initial_model_for_weight_conversion` is wrong on the original base.
    splice refuses olora/corda/loftq/pissa_niter for exactly this reason but silently loads
    lora_ga, giving outputs that are neither the trained model's nor refused."""
    peft_model = get_peft_model(make_llama(), LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj"]))
    _randomize_peft(peft_model)
    peft_model.save_pretrained(str(tmp_path))
    config_file = tmp_path / "adapter_config.json"
    config = json.loads(config_file.read_text())
    config["init_lora_weights"] = "lora_ga"  # what PEFT writes for a LoRA-GA adapter
    config_file.write_text(json.dumps(config))

    model = make_llama()
    with pytest.raises(AdapterFileError, match="lora_ga"):
        splice.load(model, tmp_path)
    assert splice.adapters(model) == {}


# -- io.peft_format / io.native: what splice writes ----------------------------------------------


def test_save_refuses_nonfinite_adapter_tensors(tmp_path: Path) -> None:
    """Bug: `splice.save` writes a LoRA whose lora_B holds a NaN without a word (and so do
    `save_state` and the native format with inf); the folder is then refused by `splice.load`
    ("holds 1 NaN values ... weights must be finite") and loads in PEFT as NaN outputs. The
    save should refuse, naming the tensor, and leave no folder behind."""
    model = make_llama()
    splice.attach(model, splice.LoRA(r=2, targets=["q_proj"]))
    randomize(model)
    with torch.no_grad():
        lora_b = next(p for n, p in splice.trainable_parameters(model).items() if "lora_B" in n)
        lora_b[0, 0] = float("nan")
    with pytest.raises(SpliceError, match=r"(?i)(nan|finite)"):
        splice.save(model, tmp_path / "adapter")
    assert not (tmp_path / "adapter").exists()


# -- io.manifest: provenance ---------------------------------------------------------------------


def test_manifest_other_base_in_bf16_is_not_a_rounding_match(tmp_path: Path) -> None:
    """Bug: the "equal up to rounding" rule accepts any base within 1% RMS (ROUNDING["bfloat16"]
    = 1e-2) once it is stored in another dtype. bf16 rounding moves a weight by at most 2^-9
    relative (2^-8 with a double rounding), yet a base whose targeted weights were changed by
    0.5% relative noise (a fine-tune) and then cast to bf16 passes as "match", so even
    provenance="strict" loads the adapter onto the wrong base. The same change in fp32 is
    (correctly) a mismatch."""
    model = make_llama()
    splice.attach(model, splice.LoRA(r=2, targets=["q_proj", "v_proj"]))
    randomize(model)
    splice.save(model, tmp_path / "adapter")

    other = make_llama()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in other.named_parameters():
            if name.endswith(("q_proj.weight", "v_proj.weight")):
                p.mul_(1 + 0.005 * torch.randn(p.shape, generator=g))
    other.to(torch.bfloat16)
    with pytest.raises(AdapterFileError, match="hash"):
        splice.load(other, tmp_path / "adapter", provenance="strict")
    assert splice.adapters(other) == {}


# -- analysis: angles, spectra, comparisons in low precision ---------------------------------------


def test_angles_identical_bf16_subspaces_are_at_angle_zero() -> None:
    """Bug: `orthonormal_basis` drops directions below S0 * max(shape) * eps(dtype) (numpy's
    matrix_rank rule) although the SVD runs in float64 on the exact input values. For bf16
    (eps 2^-7) any matrix with more than 128 rows loses every direction, so a [256, 4] bf16
    subspace against itself gives no angles and `min_principal_angle` says pi/2 (orthogonal)
    instead of 0; fp16 does the same from 1024 rows (a 4096-wide layer)."""
    U = torch.randn(256, 4, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    angles = principal_angles(U, U)
    assert angles.numel() == 4, f"expected 4 angles, got {angles.tolist()}"
    assert angles.abs().max().item() < 1e-6
    W = torch.randn(2048, 3, generator=torch.Generator().manual_seed(1)).to(torch.float16)
    assert principal_angles(W, W).numel() == 3


def test_spectra_bf16_lora_keeps_its_rank() -> None:
    """Bug: `delta_svd` (factor path) sets the round-off level to s*|B|*|A| * max(shape) *
    eps(bf16); on a 256-wide layer that is ~2x sigma_1, so every singular value of a rank-4 bf16
    LoRA is zeroed: numerical rank 0, entropy rank 0 (fp32: rank 4, entropy ~4). The factors
    are exact bf16 values and the SVD runs in float64: nothing there is bf16 round-off."""
    model = nn.Sequential(nn.Linear(256, 256))
    splice.attach(model, splice.LoRA(r=4, targets=["0"]))
    randomize(model)
    model.to(torch.bfloat16)
    (module,) = adapter_spectra(model).modules
    assert module.numerical_rank == 4, f"numerical rank {module.numerical_rank}, S {module.singular_values.tolist()}"
    assert module.entropy_rank > 3


def test_compare_bf16_delta_against_itself_is_at_angle_zero() -> None:
    """Bug: `matrix_svd` takes its round-off level as sigma_1 * max(shape) * eps(dtype); for a
    bf16 delta of a 256-wide layer that exceeds sigma_1, so `compare_deltas(d, d)` finds k=0
    directions: min angle 90 degrees and overlap 0 for an adapter compared with itself
    (cosine 1.0 in the same result)."""
    g = torch.Generator().manual_seed(0)
    delta = (torch.randn(256, 4, generator=g) @ torch.randn(4, 256, generator=g)).to(torch.bfloat16)
    result = compare_deltas(delta, delta)
    assert result.k_a >= 1 and result.k_b >= 1, (result.k_a, result.k_b)
    assert result.min_angle < 1e-3
    assert result.overlap == pytest.approx(1.0, abs=1e-6)


# -- analysis.forgetting ---------------------------------------------------------------------------


def test_forgetting_fit_refuses_nonfinite_points() -> None:
    """Bug: `fit_forgetting_law` returns a law of NaNs (a = b = r2 = r = nan, n = 3) without a
    word when one angle or forgetting value is NaN (a diverged run's accuracy), while it refuses
    other unusable input (constant angles) with a SpliceError."""
    with pytest.raises(SpliceError):
        fit_forgetting_law([0.1, 0.5, 1.0], [0.3, math.nan, 0.1])
    with pytest.raises(SpliceError):
        fit_forgetting_law([0.1, math.inf, 1.0], [0.3, 0.2, 0.1])

