"""Review of issue 21 (`splice audit`, `keygen`, `sign`) from a user's walk through the README on
the bundled models, each problem reproduced on tiny random models: each test here fails on the
reviewed code for a real reason and passes once it is fixed."""

from __future__ import annotations

from collections import Counter

import pytest
import torch
from helpers import make_bert, make_llama, randomize, save_tiny_llama
from transformers import AutoModelForCausalLM
from typer.testing import CliRunner

import splice
from splice.audit import audit
from splice.audit.contamination import contamination_test
from splice.cli.main import app
from splice.core.errors import SpliceError

runner = CliRunner()


def _not_a_traceback(result) -> None:
    """A user error: exit status 1 through the CLI's own handling (SystemExit), not an exception
    that escaped it (Click's runner reports those as status 1 too)."""
    assert result.exit_code == 1, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)


# -- splice sign / splice audit: bad paths -----------------------------------------------------------


@pytest.mark.parametrize("kind", ["missing", "file"])
def test_sign_of_a_folder_that_is_not_there_is_an_error_naming_it(tmp_path, kind):
    """`splice sign nosuch --key me.pem` printed a FileNotFoundError traceback (a file instead of
    a folder: NotADirectoryError); `splice audit nosuch` says "adapter directory nosuch does not
    exist"."""
    assert runner.invoke(app, ["keygen", str(tmp_path / "me.pem")]).exit_code == 0
    target = tmp_path / "nosuch"
    if kind == "file":
        target.write_text("not a folder\n")
    result = runner.invoke(app, ["sign", str(target), "--key", str(tmp_path / "me.pem")])
    _not_a_traceback(result)
    assert "nosuch" in result.output


def test_audit_with_a_model_folder_that_holds_no_model_is_an_error_naming_it(tmp_path):
    """`splice audit ADAPTER --model some-folder` where the folder has no config.json printed
    transformers' ValueError with a full traceback."""
    base = save_tiny_llama(tmp_path / "base")
    model = AutoModelForCausalLM.from_pretrained(base)
    splice.attach(model, splice.LoRA(r=2, targets=["q_proj"]))
    adapter = splice.save(model, tmp_path / "adapter")
    (tmp_path / "empty").mkdir()
    result = runner.invoke(app, ["audit", str(adapter), "--model", str(tmp_path / "empty"), "--scan", "off"])
    _not_a_traceback(result)
    assert "empty" in result.output


# -- a folder of several adapters ------------------------------------------------------------------


def test_audit_of_one_named_adapter_checks_each_other_folder_once(tmp_path):
    """`splice audit multi --name b`: the root folder's provenance was checked twice (it is both
    the "default" adapter among the others and the root inserted again), so its notes appear
    twice in the table, audit.md and audit.json."""
    model = make_bert(0)
    splice.attach(model, splice.LoRA(r=2, targets=["query", "value"]))
    randomize(model)
    splice.attach(model, splice.LoRA(r=2, targets=["query"]), name="b")
    randomize(model, "b", seed=1)
    folder = splice.save(model, tmp_path / "several", adapters=["default", "b"])
    report = audit(folder, make_bert(0), name="b")
    repeated = [key for key, n in Counter((f.subject, f.message) for f in report.findings).items() if n > 1]
    assert not repeated, repeated
    others = [str(o.check.folder) for o in report.sections["provenance"].others]
    assert len(others) == len(set(others)), others


# -- contamination on sets too small to tell ------------------------------------------------------


class _CharTokenizer:
    chars = "0123456789+= "
    pad_token_id, bos_token_id, eos_token_id = 0, 1, 2

    def __call__(self, text: str, add_special_tokens: bool = True) -> dict[str, list[int]]:
        ids = [3 + self.chars.index(c) for c in text]
        return {"input_ids": ([self.bos_token_id] if add_special_tokens else []) + ids}


def test_contamination_with_one_suspect_and_one_control_item_is_not_evidence():
    """One suspect vs one control item: the AUROC is 0 or 1 by chance, the bootstrap interval of a
    single pair is [1, 1], and the test flagged "evidence that it was trained on the suspect set"
    (exit status 3) on whichever order the two scores happen to fall. Under no contamination at
    all the flag rule fires for about half of 1 vs 1, 17% of 2 vs 2 and 8% of 3 vs 3 draws (per
    score, four adapter scores). Too few items should be refused or reported as inconclusive."""
    torch.manual_seed(0)
    model = make_llama()
    splice.attach(model, splice.LoRA(r=2, targets=["q_proj", "v_proj"]))
    randomize(model, scale=0.3)
    model.eval()
    items = [("12+34=", "46"), ("21+13=", "34")]
    flagged = []
    for suspect, control in ((items[:1], items[1:]), (items[1:], items[:1])):
        try:
            result = contamination_test(model, _CharTokenizer(), suspect, control, cdd_samples=2, new_tokens=2)
        except SpliceError:
            continue  # refusing too few items is a fix too
        flagged += [f.message for f in result.findings if f.severity == "flag"]
    assert not flagged, flagged
