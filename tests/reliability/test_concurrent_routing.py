"""`route` from several threads on one shared model, and blocks left out of order (issue 13).

Before, `route` stored its plan on the shared model's hosts: two threads routing 200 times got
41-93 outputs through the other thread's adapter, and exiting two blocks out of order left every
later forward routed to the first adapter, even after `activate`/`deactivate`.
"""

from __future__ import annotations

import threading

import pytest
import torch
from helpers import make_llama, randomize

import splice
from splice.core.errors import SpliceError

pytestmark = pytest.mark.guards("silent")


@pytest.fixture(scope="module")
def served():
    """A tiny Llama with adapters a and b (random factors) and each adapter's reference logits."""
    model = make_llama().eval()
    for i, name in enumerate("ab"):
        splice.attach(model, splice.LoRA(r=4, targets=["q_proj", "v_proj"]), name)
        randomize(model, name, seed=i)
    ids = torch.randint(0, 64, (2, 7), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = {}
        for name in "ab":
            splice.activate(model, name)
            expected[name] = model(input_ids=ids).logits
    splice.deactivate(model)
    with torch.no_grad():
        expected[None] = model(input_ids=ids).logits
    return model, ids, expected


@pytest.mark.parametrize("grouped", [True, False])
def test_threads_routing_one_model_each_get_their_own_adapter(served, grouped):
    model, ids, expected = served
    wrong: list[tuple[str, int]] = []
    start = threading.Barrier(3)

    def serve(name: str | None) -> None:
        start.wait()
        for i in range(60):
            with torch.no_grad(), splice.route(model, [name, name], grouped=grouped):
                out = model(input_ids=ids).logits
            if not torch.allclose(out, expected[name], atol=1e-5):
                wrong.append((str(name), i))

    threads = [threading.Thread(target=serve, args=(n,)) for n in ("a", "b", None)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert wrong == []


def test_blocks_left_out_of_order_leave_no_route_behind(served):
    model, ids, expected = served
    outer, inner = splice.route(model, ["a", "a"]), splice.route(model, ["b", "b"])
    outer.__enter__()
    inner.__enter__()
    with torch.no_grad():
        assert torch.allclose(model(input_ids=ids).logits, expected["b"], atol=1e-5)  # innermost wins
    outer.__exit__(None, None, None)
    with torch.no_grad():
        assert torch.allclose(model(input_ids=ids).logits, expected["b"], atol=1e-5)
    inner.__exit__(None, None, None)
    with torch.no_grad():
        assert torch.allclose(model(input_ids=ids).logits, expected[None], atol=1e-5)
        splice.activate(model, "a")
        assert torch.allclose(model(input_ids=ids).logits, expected["a"], atol=1e-5)
    splice.deactivate(model)


def test_a_route_of_one_model_does_not_touch_another(served):
    model, ids, expected = served
    other = make_llama().eval()
    with torch.no_grad():
        plain = other(input_ids=ids).logits
        with splice.route(model, ["a", "b"]):
            assert torch.equal(other(input_ids=ids).logits, plain)


@pytest.mark.guards("crash")
@pytest.mark.parametrize("name", ["training", "_modules", "_parameters", "keys", "merged"])
def test_adapter_names_that_are_module_attributes_are_refused_up_front(name):
    model = make_llama()
    with pytest.raises(SpliceError, match="reserved"):
        splice.attach(model, splice.LoRA(r=2, targets=["q_proj"], train_also=["lm_head"]), name)
    assert splice.adapters(model) == {}
    assert not any(n.endswith((".splice", "splice_heads")) for n, _ in model.named_modules())
