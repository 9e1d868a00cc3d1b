"""What a forward sees of its batch (splice.core.inputs): cached decoding steps are told from the
shapes transformers guarantees, whatever keyword arguments a release passes (4.45 - 5.x), and
inside `generate` without a cache only the prompt's columns count as the prompt."""

from __future__ import annotations

import copy
import inspect

import pytest
import torch
from helpers import make_llama
from torch import nn

import splice
from splice.core.host import hosts
from splice.core.inputs import _is_decoding_step
from splice.core.model_state import model_state
from splice.methods.loreft import LoReFT

# Left padding of 3, 1 and 0 tokens: each row's prompt is the attended part.
PROMPTS = {
    "input_ids": torch.tensor([[0, 0, 0, 5, 6, 7], [0, 8, 9, 10, 11, 12], [13, 14, 15, 16, 17, 18]]),
    "attention_mask": torch.tensor([[0, 0, 0, 1, 1, 1], [0, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]]),
}
WIDTH, NEW = 6, 4
# LoReFT "f1+l1": the first and the last prompt token of each row.
EDITED = torch.tensor([[0, 0, 0, 1, 0, 1], [0, 1, 0, 0, 0, 1], [1, 0, 0, 0, 0, 1]], dtype=torch.bool)


class Steps:
    """A pre-hook inside the model (layer 0) that records what each forward's batch says."""

    def __init__(self, model: nn.Module) -> None:
        self.seen: list[tuple[bool, int, int | None, int]] = []  # decoding, new positions, prompt_width, rows
        self.recorder = model_state(model).inputs_recorder
        self.handle = model.model.layers[0].register_forward_pre_hook(self.record)

    def record(self, module: nn.Module, args: tuple) -> None:
        inputs = self.recorder.current()
        self.seen.append((inputs.decoding, args[0].shape[1], inputs.prompt_width, args[0].shape[0]))

    @property
    def flags(self) -> list[bool]:
        return [decoding for decoding, *_ in self.seen]


class Edits:
    """Base and edited outputs of a layer (hooks around the one `attach` adds)."""

    def __init__(self, layer: nn.Module, before: bool) -> None:
        self.outputs: list[torch.Tensor] = []
        self.handle = layer.register_forward_hook(self.record, prepend=before)

    def record(self, module: nn.Module, args: tuple, output) -> None:
        self.outputs.append((output[0] if isinstance(output, tuple) else output).detach().clone())


def generate(model: nn.Module, **options) -> torch.Tensor:
    with torch.no_grad():
        return model.generate(**PROMPTS, max_new_tokens=NEW, do_sample=False, pad_token_id=0, **options)


def reft_llama() -> nn.Module:
    model = make_llama()
    splice.attach(model, LoReFT(positions="f1+l1"))
    return model


MODES = {
    "cache": {"use_cache": True},
    "no-cache": {"use_cache": False},
    "beams-cache": {"use_cache": True, "num_beams": 3},
    "beams-no-cache": {"use_cache": False, "num_beams": 3},
}


@pytest.mark.parametrize("mode", list(MODES))
def test_decoding_steps_are_flagged_exactly_when_they_are_cached(mode):
    options = MODES[mode]
    model = reft_llama()
    steps = Steps(model)
    tokens = generate(model, **options)
    beams = options.get("num_beams", 1)
    assert tokens.shape == (3, WIDTH + NEW)
    assert len(steps.seen) == NEW  # the prefill, then one forward per further token
    assert all(rows == 3 * beams for *_, rows in steps.seen)
    if options["use_cache"]:
        assert steps.flags == [False] + [True] * (NEW - 1)
        assert [new for _, new, _, _ in steps.seen] == [WIDTH] + [1] * (NEW - 1)
    else:  # every step re-runs the whole sequence: none is a decoding step, the prompt stays its columns
        assert steps.flags == [False] * NEW
        assert [new for _, new, _, _ in steps.seen] == [WIDTH + i for i in range(NEW)]
        assert [width for _, _, width, _ in steps.seen] == [None] + [WIDTH] * (NEW - 1)


@pytest.mark.parametrize("mode", list(MODES))
def test_reft_edits_the_prompt_positions_only_whatever_the_decoding(mode):
    options = MODES[mode]
    model = make_llama()
    layers = model.model.layers
    splice.attach(model, LoReFT(positions="f1+l1"))
    before = [Edits(layer, before=True) for layer in layers]
    after = [Edits(layer, before=False) for layer in layers]
    generate(model, **options)
    expected = EDITED.repeat_interleave(options.get("num_beams", 1), dim=0)
    for layer, (b, a) in enumerate(zip(before, after, strict=True)):
        assert len(a.outputs) == NEW
        for step, (base, edited) in enumerate(zip(b.outputs, a.outputs, strict=True)):
            at = (edited - base).abs().amax(-1) > 0
            if options["use_cache"] and step:
                assert at.shape[1] == 1 and not at.any(), (layer, step)  # generated tokens: never edited
            else:
                assert torch.equal(at[:, :WIDTH], expected), (layer, step)
                assert not at[:, WIDTH:].any(), (layer, step)  # nor the generated ones re-run without cache


@pytest.mark.parametrize("beams", [1, 3])
def test_the_cache_does_not_change_what_a_reft_model_generates(beams):
    model = reft_llama()
    with torch.no_grad():
        for param in splice.trainable_parameters(model).values():
            param.add_(torch.randn(param.shape, generator=torch.Generator().manual_seed(1)) * 0.5)
    cached = generate(model, use_cache=True, num_beams=beams)
    uncached = generate(model, use_cache=False, num_beams=beams)
    with splice.disabled(model):
        base = generate(model, use_cache=True, num_beams=beams)
    assert torch.equal(cached, uncached)
    assert not torch.equal(cached, base)  # the edit matters, so the equality means something


def cache_argument(model: nn.Module) -> str:
    """The name the installed transformers gives the cache argument (5.x: cache, 4.x: past_key_values)."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def test_a_hand_written_decoding_loop_is_told_by_the_mask_or_by_the_cache():
    model = reft_llama()
    steps = Steps(model)
    ids, mask = PROMPTS["input_ids"], PROMPTS["attention_mask"]
    name = cache_argument(model)
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, use_cache=True)
        cache = out[name] if name in out else out["past_key_values"]
        following = out.logits[:, -1].argmax(-1, keepdim=True)
        longer = torch.cat([mask, torch.ones_like(following)], 1)
        out = model(input_ids=following, attention_mask=longer, use_cache=True, **{name: cache})
        cache = out[name] if name in out else out["past_key_values"]
        model(input_ids=following, use_cache=True, **{name: cache})  # no mask: the cache's length decides
        model(input_ids=torch.cat([ids, following], 1), attention_mask=longer)  # a plain forward again
    assert steps.flags == [False, True, True, False]


class FakeCache:
    def __init__(self, length: int) -> None:
        self.length = length

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.length


@pytest.mark.parametrize(("new", "mask", "kwargs", "decoding"), [
    (5, torch.ones(2, 5), {}, False),
    (1, torch.ones(2, 5), {}, True),  # the mask covers 4 cached positions
    (5, torch.ones(2, 5), {"cache": FakeCache(0)}, False),  # an empty cache: the prefill
    (1, None, {"cache": FakeCache(4)}, True),
    (1, None, {"past_key_values": FakeCache(4)}, True),
    (1, None, {"some_future_name": FakeCache(4)}, True),
    (1, torch.zeros(2, 1, 1, 8), {"cache": FakeCache(4)}, True),  # a 4-D mask of a static cache
    (5, torch.zeros(2, 1, 5, 8), {"cache": FakeCache(0)}, False),
    (1, None, {"past_key_values": ((torch.zeros(2, 2, 4, 3), torch.zeros(2, 2, 4, 3)),)}, True),  # legacy tuples
    (1, None, {"cache_position": torch.tensor([4])}, True),
    (5, None, {"cache_position": torch.arange(5)}, False),
    (None, None, {}, False),
])
def test_decoding_is_told_from_shapes_and_caches_not_argument_names(new, mask, kwargs, decoding):
    assert _is_decoding_step(new, mask, kwargs) is decoding


def test_generate_is_wrapped_while_attached_and_restored_on_detach():
    model = make_llama()
    splice.attach(model, LoReFT(positions="f1+l1"))
    assert "generate" in model.__dict__
    clone = copy.deepcopy(model)
    assert clone.generate.model is clone and clone.generate.recorder is not model.generate.recorder
    assert torch.equal(generate(clone, use_cache=False), generate(model, use_cache=True))
    splice.detach(model, "default")
    assert "generate" not in model.__dict__
    generate(model)  # the class's generate again


def test_an_adapter_reads_the_batch_of_its_own_model_never_another_models():
    first, second = reft_llama(), reft_llama()
    ids = PROMPTS["input_ids"]
    with torch.no_grad():
        first(**PROMPTS)
        second(input_ids=ids[:1, 2:], attention_mask=PROMPTS["attention_mask"][:1, 2:])
    adapter = next(host["default"] for _, _, host in hosts(first))
    assert torch.equal(adapter.batch_inputs().input_ids, ids)  # first's last batch, not second's
    # outside any forward, as activation checkpointing recomputes a block during backward
    h = torch.randn(3, WIDTH, 32)
    assert adapter.delta(h, h).shape == h.shape
    splice.detach(first, "default")
    assert adapter.batch_inputs() is None
