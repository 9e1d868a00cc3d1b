"""Review of adapter placement (PAGE, DomLoRA, `splice probe`) and post-training compression
beyond PARA's main path (JACTUS calibration and allocation, FactorizedLinear files, PARA's
in-memory sources and `splice compress --sweep`).

Each test pins a defect found in review: it fails on the reviewed code and passes once the
defect is fixed (where two fixes are reasonable, e.g. refuse an input or honour it, the test
accepts either)."""

from __future__ import annotations

import copy
import json
import math
import re
import sys

import helpers
import numpy as np
import pytest
import torch
from helpers import VOCAB, make_bert, make_llama, randomize, save_tiny_bert, sentiment_rows
from safetensors.torch import load_file, save_file
from transformers import AlbertConfig, AlbertForSequenceClassification, BartConfig, BartForConditionalGeneration
from typer.testing import CliRunner

import splice
from splice.cli.main import app
from splice.compression.calibration import calibrate
from splice.compression.factorized import WEIGHTS_NAME, load_factorized, save_factorized
from splice.compression.jactus import jactus
from splice.compression.para import compress
from splice.core.errors import SpliceError
from splice.core.host import hosts
from splice.placement import page

runner = CliRunner()


def llama_batches(n: int = 2, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    generator = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(0, VOCAB, (3, 9), generator=generator)
        out.append({"input_ids": ids, "labels": ids})
    return out


def bert_batches(n: int = 2, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    generator = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(1, VOCAB, (3, 9), generator=generator)
        out.append({"input_ids": ids, "attention_mask": torch.ones_like(ids),
                    "labels": torch.randint(0, 2, (3,), generator=generator)})
    return out


def tiny_albert() -> AlbertForSequenceClassification:
    """ALBERT shares one layer's weights across all its layers: each Linear runs twice per pass."""
    torch.manual_seed(0)
    config = AlbertConfig(vocab_size=VOCAB, embedding_size=16, hidden_size=32, num_hidden_layers=2,
                          num_attention_heads=4, intermediate_size=40, max_position_embeddings=32, num_labels=2,
                          hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    return AlbertForSequenceClassification(config).eval()


# -- PAGE ---------------------------------------------------------------------------------------


def test_page_module_run_twice_per_pass_scores_its_whole_gradient():
    """page.py:113-126 keeps one `_x` per probe: a Linear that runs twice in a forward (ALBERT's
    shared layers) has its first input overwritten, and the second backward hook then finds
    `_x = None` and crashes with AttributeError. PAGE must equal ‖∂L/∂B‖² of a real zero-B LoRA
    there, whose gradient sums over both calls."""
    model = tiny_albert()
    batch = {"input_ids": torch.randint(1, VOCAB, (3, 9), generator=torch.Generator().manual_seed(0)),
             "labels": torch.tensor([0, 1, 1])}
    lora = copy.deepcopy(model)
    splice.attach(lora, splice.LoRA(r=2, alpha=4, targets="all-linear"))
    lora.eval()
    lora(**batch).loss.backward()
    factors = {name: host["default"].lora_A for name, _, host in hosts(lora)}
    want = {name: host["default"].lora_B.grad.square().sum().item() for name, _, host in hosts(lora)}
    got = {s.name: s.sampled for s in page(model, [batch], "all-linear", r=2, alpha=4, score="sampled",
                                         factors=factors).sites}
    assert set(got) == set(want)
    for name in want:
        assert math.isclose(got[name], want[name], rel_tol=1e-4, abs_tol=1e-12), name


def test_page_nonfinite_loss_is_refused_not_ranked():
    """page.py:214-217 and 172-180: a probe batch whose loss is NaN (an overflowing bf16/fp16 model,
    a bad batch) turns every score into NaN; the sort then leaves the candidates in model order
    and DomLoRA silently adapts the first one (layer 0 q_proj), with shares of NaN. A non-finite
    loss (or score) must be refused, naming the batch."""
    model = make_llama()
    batches = llama_batches(2)

    def loss_fn(net, i):
        loss = net(**batches[i]).loss
        return loss * float("nan") if i == 0 else loss

    with pytest.raises(SpliceError, match=r"(?i)nan|finite"):
        page(model, [0, 1], "all-linear", r=4, loss_fn=loss_fn)


@pytest.mark.parametrize("options", [{"r": 0}, {"r": -1}, {"r": 4, "alpha": float("nan")},
                                     {"r": 4, "alpha": float("inf")}])
def test_page_bad_rank_or_alpha_gets_a_clear_error(options):
    """page.py:167/192: r = 0 raises a bare ZeroDivisionError, r < 0 a torch "negative dimension"
    RuntimeError (so `splice probe --r 0` prints a traceback), and alpha = NaN/inf is accepted and
    gives NaN/inf scores and an arbitrary "dominant module". Each must be a SpliceError naming it."""
    with pytest.raises(SpliceError, match=r"\br\b|alpha"):
        page(make_llama(), llama_batches(1), "all-linear", **options)


def test_page_factors_for_modules_that_are_not_candidates_are_refused():
    """page.py:193: `factors` entries whose names match no candidate (a PEFT-prefixed name, a typo,
    an excluded module) are silently ignored and a random A is drawn instead, so the "sampled"
    score is not that of the user's adapter. Unknown names must be refused, listing candidates."""
    model = make_llama()
    A = torch.zeros(4, helpers.HIDDEN)
    with pytest.raises(SpliceError, match="base_model.model.model.layers.0.self_attn.q_proj"):
        page(model, llama_batches(1), "all-linear", r=4, score="sampled",
             factors={"base_model.model.model.layers.0.self_attn.q_proj": A})


def test_page_heatmap_keeps_encoder_and_decoder_layers_apart(tmp_path):
    """page.py:81-87: the heatmap's cell is (layer number, path inside the layer), so in an
    encoder-decoder model `model.encoder.layers.0.self_attn.q_proj` and
    `model.decoder.layers.0.self_attn.q_proj` share a cell and the one written last (the lower
    score) hides the other: on a tiny BART the picture shows ~10% of the shares instead of 100%."""
    torch.manual_seed(0)
    config = BartConfig(vocab_size=VOCAB, d_model=16, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
                        decoder_attention_heads=2, encoder_ffn_dim=24, decoder_ffn_dim=24, max_position_embeddings=32,
                        pad_token_id=1, bos_token_id=0, eos_token_id=2, decoder_start_token_id=2)
    model = BartForConditionalGeneration(config).eval()
    ids = torch.randint(3, VOCAB, (2, 7), generator=torch.Generator().manual_seed(0))
    placement = page(model, [{"input_ids": ids, "labels": ids}], r=2)
    module = sys.modules["splice.placement.page"]
    shown = []
    original = module.save_png

    def capture(fig, path, dpi=100):
        shown.append(np.asarray(fig.axes[0].images[0].get_array(), dtype=float))
        return original(fig, path, dpi)

    module.save_png = capture
    try:
        placement.heatmap(tmp_path / "heatmap.png")
    finally:
        module.save_png = original
    assert np.nansum(shown[0]) == pytest.approx(100.0, rel=1e-6)


# -- DomLoRA ------------------------------------------------------------------------------------


def test_domlora_form_rank_does_not_silently_override_the_scored_rank():
    """domlora.py:317-318: `spec.setdefault("r", self.r)` lets a form mapping's own r win, so
    DomLoRA(r=4, form={"method": "lora", "r": 16}) scores PAGE for r=4 but attaches r=16, while
    the docstring says the form's "r/alpha come from here". Refuse the conflict or use r=4."""
    model = make_llama()
    try:
        splice.attach(model, splice.DomLoRA(r=4, form={"method": "lora", "r": 16}, probe=llama_batches()))
    except SpliceError as err:
        assert "r" in str(err)
        return
    assert splice.adapters(model)["default"].r == 4


# -- JACTUS -------------------------------------------------------------------------------------


def test_jactus_calibration_with_a_nonfinite_loss_is_refused():
    """calibration.py:125-134: a NaN loss gives NaN gradient covariances that `calibrate` returns
    silently; `jactus` then dies in torch (`_LinAlgError: linalg.eigh failed to converge`) with no
    word about the cause. Calibration must refuse non-finite losses/statistics with a SpliceError."""
    model = make_bert()

    def loss_fn(net, batch):
        return net(**batch).loss * float("nan")

    with pytest.raises(SpliceError, match=r"(?i)nan|finite"):
        calibrate(model, bert_batches(), loss_fn=loss_fn)


def test_jactus_statistics_of_the_wrong_shape_name_the_module_and_both_shapes():
    """jactus.py:283-287 checks only that precomputed statistics have the targets' names, not
    their shapes: statistics of a 32-wide model given to a 48-wide one die in a matmul with
    "mat1 and mat2 shapes cannot be multiplied (48x48 and 32x32)". The error must name the module
    and both shapes."""
    stats = calibrate(make_bert(), bert_batches())
    wide = make_bert(hidden=48)
    with pytest.raises(SpliceError, match=r"bert\.(encoder|pooler)") as info:
        jactus(wide, stats, budget=0.8)
    assert "32" in str(info.value) and "48" in str(info.value)


def test_factorized_load_refuses_nonfinite_tensors(tmp_path):
    """factorized.py:146-200: `load_factorized` checks format, names and shapes but loads NaN/inf
    factors silently (PEFT adapter files are refused for that, `peft_keys.check_peft_tensors`),
    so the model outputs NaN. A non-finite tensor must be refused, naming it."""
    model = make_bert()
    jactus(model, bert_batches(), budget=0.8, targets=["query"])
    folder = save_factorized(model, tmp_path / "f")
    tensors = load_file(str(folder / WEIGHTS_NAME))
    key = "bert.encoder.layer.0.attention.self.query.core"
    tensors[key][0, 0] = float("nan")
    save_file(tensors, str(folder / WEIGHTS_NAME), metadata={"format": "pt"})
    with pytest.raises(SpliceError, match=key):
        load_factorized(make_bert(), folder)


# -- PARA ---------------------------------------------------------------------------------------


def test_para_compress_of_a_diverged_model_adapter_names_the_module():
    """para.py:152 / core/svd.py:45: `splice.compress(model, ...)` on an attached adapter with a NaN
    factor dies with torch's `_LinAlgError: linalg.svd ... non-finite values`, naming nothing
    (a PEFT folder with the same NaN is refused by name). It must be a SpliceError naming the module."""
    model = make_bert()
    splice.attach(model, splice.LoRA(r=4, targets=["query", "value"]))
    randomize(model)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name and "layer.1.attention.self.value" in name:
                param[0, 0] = float("nan")
    with pytest.raises(SpliceError, match="layer.1.attention.self.value"):
        compress(model, budget=0.5)


@pytest.fixture(scope="module")
def tiny_adapter(tmp_path_factory):
    folder = save_tiny_bert(tmp_path_factory.mktemp("tiny") / "tiny-bert", dropout=0.0)
    from splice.train.tasks import load_pretrained

    model = load_pretrained(str(folder), "classification", ("0", "1"))
    splice.attach(model, splice.LoRA(r=4, alpha=8, targets=["query", "value"], train_also=["classifier"]))
    randomize(model)
    return splice.save(model, tmp_path_factory.mktemp("adapter") / "adapter")


def test_compress_cli_sweep_with_a_repeated_budget(tiny_adapter, tmp_path):
    """compress_cmd.py:113-130 accepts `--sweep 0.5,0.5`; `para.sweep` keys points by budget, so
    one point survives while both evaluations are recorded, and `DataSweep.to_dict`'s
    zip(strict=True) raises ValueError after all the evaluation work: a traceback, nothing
    written. Refuse repeated budgets up front (exit 1, message) or write one point per budget."""
    out = tmp_path / "sweep"
    result = runner.invoke(app, ["compress", str(tiny_adapter), "--sweep", "0.5,0.5", "--data", "rotten_tomatoes",
                                 "--max-eval-examples", "8", "--out", str(out)])
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    if result.exit_code == 0:
        report = json.loads((out / "sweep.json").read_text())
        assert [p["budget"] for p in report["points"]] == [0.5]
    else:
        assert result.exit_code == 1 and "0.5" in result.output


# -- splice probe -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def probe_job(tmp_path_factory):
    from splice.train import TrainConfig

    root = tmp_path_factory.mktemp("probe")
    folder = save_tiny_bert(root / "tiny-bert", dropout=0.0)
    data = root / "train.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in sentiment_rows(16, 1)))
    path = root / "job.yaml"
    TrainConfig(model=str(folder), data=str(data), batch_size=4, output_dir=str(root / "run")).to_yaml(path)
    return path


@pytest.mark.parametrize(("args", "option"), [(["--batches", "-1"], "batches"), (["--r", "0"], r"--r\b|\br\b|rank")])
def test_probe_cli_bad_numbers_get_a_message_not_a_traceback(probe_job, tmp_path, args, option):
    """probe_cmd.py:59-60: `--batches -1` reaches itertools.islice (ValueError: "Stop argument for
    islice() must be None or an integer") and `--r 0` reaches page's ZeroDivisionError; both end
    in a traceback after the model and data are loaded. Each must be a usage error (exit 2, as
    other commands' bad option values) naming the option."""
    result = runner.invoke(app, ["probe", str(probe_job), *args, "--out", str(tmp_path / "p")])
    assert isinstance(result.exception, SystemExit) and result.exit_code == 2, repr(result.exception)
    assert re.search(option, result.output), result.output
