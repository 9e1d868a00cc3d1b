"""What the audit's behaviour checks share when they run a model: the adapter session (the
adapter on, eval mode, everything as before afterwards), refusing to run inside
`splice.disabled`, the model's position limit, greedy generation whatever the model's own
generation config says, and padded token batches.

`trigger_scan` and the contamination scores compare a model with an adapter against its base
(the same model within `splice.disabled`). Run inside a `splice.disabled` block, both sides
would be the base and every difference 0: a clean bill for any adapter, so they refuse.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from splice.core.api import activate, active_adapters, deactivate
from splice.core.errors import SpliceError
from splice.core.host import hosts
from splice.core.modes import evaluating

# Greedy decoding, stated in full: `generate` starts from the model's generation config (a chat
# model's says do_sample=True, a repetition penalty, no-repeat n-grams, a minimum length, ...),
# and only keyword arguments override it. Every entry that changes which token is picked, or
# what `generate` returns, is set to its neutral value here.
GREEDY: dict[str, Any] = {
    "do_sample": False, "num_beams": 1, "num_beam_groups": 1, "diversity_penalty": 0.0, "num_return_sequences": 1,
    "repetition_penalty": 1.0, "encoder_repetition_penalty": 1.0, "no_repeat_ngram_size": 0,
    "encoder_no_repeat_ngram_size": 0, "min_new_tokens": 0, "bad_words_ids": None,
    "sequence_bias": None, "suppress_tokens": None, "begin_suppress_tokens": None, "forced_bos_token_id": None,
    "forced_eos_token_id": None, "exponential_decay_length_penalty": None, "guidance_scale": None,
    "renormalize_logits": False, "remove_invalid_values": False, "watermarking_config": None, "stop_strings": None,
    "return_dict_in_generate": False,
}


def check_enabled(model: nn.Module, caller: str, consequence: str) -> None:
    """Refuse to run inside `splice.disabled(model)` (module doc); `consequence` says what the
    check would compute there."""
    if any(not host.enabled for _, _, host in hosts(model)):
        raise SpliceError(f"{caller} called inside splice.disabled(model): the adapter is switched off, so "
                          f"{consequence}; call it outside the block")


@contextmanager
def adapter_session(model: nn.Module, adapter: str | None) -> Iterator[None]:
    """Within the block: `adapter` the only active adapter (None: the active ones as they are),
    every module in eval mode, no gradients. Afterwards the active adapters, each submodule's
    train/eval mode and each parameter's requires_grad are as they were (a submodule the user
    keeps in eval mode inside a training model stays so)."""
    before = active_adapters(model)
    requires_grad = {param: param.requires_grad for param in model.parameters()}
    with evaluating(model):
        try:
            if adapter is not None:
                activate(model, adapter)
            with torch.no_grad():
                yield
        finally:
            if adapter is not None:
                if before:
                    activate(model, before)
                else:
                    deactivate(model)
            for param, flag in requires_grad.items():
                param.requires_grad_(flag)


def position_limit(model: nn.Module) -> int | None:
    """The number of positions the model is built (or trained) for: its config's
    `max_position_embeddings` (GPT-2's `n_positions` answers to that name too); None where the
    config names none."""
    limit = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    return limit if isinstance(limit, int) and not isinstance(limit, bool) and limit > 0 else None


def check_fits(model: nn.Module, needs: Sequence[tuple[str, int]], caller: str) -> None:
    """Refuse the first (description, positions needed) of `needs` that is longer than the
    model's position limit: an absolute position embedding fails deep inside the model with an
    IndexError there, and a rotary one computes what it was never trained on."""
    limit = position_limit(model)
    if limit is None:
        return
    over = [(what, length) for what, length in needs if length > limit]
    if over:
        what, length = over[0]
        others = f" ({len(over) - 1} more too long)" if len(over) > 1 else ""
        raise SpliceError(f"{caller}: {what} needs {length} positions, but the model has {limit} "
                          f"(config.max_position_embeddings){others}; shorten it")


def eos_ids(model: nn.Module) -> set[int]:
    """The ids that end generation (the model's generation config), as a set."""
    eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    return set() if eos is None else {eos} if isinstance(eos, int) else set(eos)


def generate_greedy(model: nn.Module, ids: torch.Tensor, mask: torch.Tensor, new_tokens: int, pad: int,
                    **extra: Any) -> torch.Tensor:
    """The `new_tokens` tokens `generate` appends to each row of the left-padded batch `ids`,
    decoded greedily (`GREEDY`) whatever the model's generation config says; `extra` are further
    keyword arguments of `generate` (a logits processor)."""
    output = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new_tokens, pad_token_id=pad,
                            **GREEDY, **extra)
    return output[:, ids.shape[1] :]


def padded(rows: list[list[int]], pad: int, *, left: bool, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Token id lists as one batch padded with `pad` on the left or right, and its attention mask."""
    width = max(len(row) for row in rows)
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        span = slice(width - len(row), width) if left else slice(0, len(row))
        ids[i, span] = torch.tensor(row, dtype=torch.long)
        mask[i, span] = 1
    return ids.to(device), mask.to(device)


def device_of(model: nn.Module) -> torch.device:
    """Where the model's parameters are (the CPU for a model without any)."""
    parameter = next(model.parameters(), None)
    return parameter.device if parameter is not None else torch.device("cpu")
