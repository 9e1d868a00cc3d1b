"""FED-FSTQ's primitives (Li et al., arXiv 2604.25421), pure tensor functions testable without
Flower: a per-token Fisher proxy read from the embedding gradient, its EMA, a top-K token mask,
a bit allocation monotone in importance, per-row quantisation with a float16 scale, and bit
packing whose byte count is known in closed form.

    F_i = ||dL/de_i||^2                      the Fisher proxy of input position i (`token_fisher`)
    a_t = beta a_{t-1} + (1 - beta) s_t      its smoothing across steps (`ema_update`)
    keep = top ceil(rho n) of the valid scores, per sequence (`topk_mask`)
    b_r in levels, more bits for a larger importance (`allocate_bits`)
    x_hat = scale_r (q - z_r), q in [0, 2^b_r)  (`quantize`, `dequantize`)

`encode_delta` / `decode_delta` put a whole adapter update into one uint8 payload (level map,
scales, codes per level) of exactly `payload_bytes` bytes. NaN in a score table means "no
observation yet": `ema_update` starts from the first observation and `lookup` ranks such a token
first, so every token is measured at least once.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from splice.core.errors import SpliceError

LEVELS = (2, 4, 8)
FP16_TINY, FP16_MAX = 2.0 ** -24, 65504.0  # float16's smallest subnormal and largest finite value


# -- the token Fisher proxy ------------------------------------------------------------------


class FisherHook:
    """Records F_i = ||dL/de_i||^2, shape [B, L], for every input position i of the model's
    input-embedding output e, whenever a loss computed from that forward is backpropagated.

    A forward hook on `model.get_input_embeddings()` registers a gradient hook on its output;
    a frozen embedding's output (which autograd would not differentiate) is replaced by an
    identical leaf that requires grad, so the forward is unchanged bit for bit. `on_scores(F)`,
    if given, is called inside the backward pass (no graph) with each batch's scores.
    Use as a context manager, or call `remove()`.
    """

    def __init__(self, model: torch.nn.Module, on_scores: Callable[[torch.Tensor], None] | None = None) -> None:
        embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
        if not isinstance(embeddings, torch.nn.Module):
            raise SpliceError(f"{type(model).__name__} has no input embedding module (get_input_embeddings): the "
                              "token Fisher proxy reads the gradient of its output")
        self.on_scores = on_scores
        self.scores: torch.Tensor | None = None
        self.embeds: torch.Tensor | None = None
        self.handle = embeddings.register_forward_hook(self._forward)

    def _forward(self, module: torch.nn.Module, args: Any, output: torch.Tensor) -> torch.Tensor | None:
        if not torch.is_grad_enabled():
            return None
        replaced = not output.requires_grad
        if replaced:
            output = output.detach().requires_grad_(True)
        output.register_hook(self._backward)
        self.embeds = output
        return output if replaced else None

    def _backward(self, grad: torch.Tensor) -> None:
        with torch.no_grad():
            self.scores = grad.detach().float().pow(2).sum(-1)
            self.embeds = None  # the activation is no longer needed
            if self.on_scores is not None:
                self.on_scores(self.scores)

    def remove(self) -> None:
        self.handle.remove()

    def __enter__(self) -> FisherHook:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()


def token_fisher(model: torch.nn.Module, batch: Mapping[str, torch.Tensor],
                 loss_fn: Callable[[torch.nn.Module, Mapping[str, torch.Tensor]], torch.Tensor] | None = None
                 ) -> torch.Tensor:
    """F [B, L]: F_i = ||dL/de_i||^2 of the batch's loss L (`loss_fn(model, batch)`, default the
    model's own) with respect to each position's input embedding, read by `FisherHook`. Only the
    embedding gradient is computed (`autograd.grad`): no parameter's `.grad` changes."""
    with FisherHook(model) as hook:
        loss = model(**batch).loss if loss_fn is None else loss_fn(model, batch)
        if hook.embeds is None:
            raise SpliceError("the loss was computed without a differentiable embedding forward (no_grad?)")
        torch.autograd.grad(loss, hook.embeds)
    assert hook.scores is not None
    return hook.scores


# -- smoothing, lookup and the token mask ----------------------------------------------------


def ema_update(average: torch.Tensor | None, scores: torch.Tensor, beta: float = 0.9) -> torch.Tensor:
    """a_t = beta a_{t-1} + (1 - beta) s_t, elementwise. NaN means "not observed": where s_t is
    NaN, a_{t-1} is kept; where a_{t-1} is NaN (or None), a_t = s_t (the first observation)."""
    if not 0.0 <= beta < 1.0:
        raise SpliceError(f"the EMA's beta must be in [0, 1), got {beta}")
    if average is None:
        return scores.clone()
    blended = beta * average + (1.0 - beta) * scores
    return torch.where(scores.isnan(), average, torch.where(average.isnan(), scores, blended))


def vocab_mean(ids: torch.Tensor, values: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """[vocab_size]: the mean of `values` over the positions holding each token id (ids and
    values of the same shape); NaN for an id that does not occur."""
    ids, values = ids.reshape(-1).long(), values.reshape(-1).float()
    total = torch.zeros(vocab_size, dtype=torch.float32, device=values.device).index_add_(0, ids, values)
    count = torch.zeros(vocab_size, dtype=torch.float32, device=values.device).index_add_(
        0, ids, torch.ones_like(values))
    return torch.where(count > 0, total / count.clamp(min=1), torch.full_like(total, math.nan))


def lookup(table: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """The table's score of each id; an unobserved id (NaN) scores +inf, so it is kept first."""
    return table[ids.long()].nan_to_num(nan=math.inf)


def topk_mask(scores: torch.Tensor, keep_ratio: float, valid: torch.Tensor | None = None) -> torch.Tensor:
    """bool, scores' shape [..., L]: per sequence (last dim), the ceil(keep_ratio * n) valid
    positions of highest score, n the sequence's valid positions (at least one kept when n > 0).
    Ties go to the earlier position (a stable sort), so the mask is deterministic."""
    if not 0.0 < keep_ratio <= 1.0:
        raise SpliceError(f"keep_ratio must be in (0, 1], got {keep_ratio}")
    valid = torch.ones_like(scores, dtype=torch.bool) if valid is None else valid.bool()
    n = valid.sum(-1, keepdim=True).double()
    k = torch.ceil(n * keep_ratio - 1e-9).clamp(min=1.0).minimum(n)  # 1e-9: 0.3 * 10 is 3, not 3.0000000000000004
    ranked = scores.float().masked_fill(~valid, -math.inf)
    order = torch.argsort(ranked, dim=-1, descending=True, stable=True)
    rank = torch.empty_like(order).scatter_(-1, order, torch.arange(scores.shape[-1], device=scores.device)
                                            .expand_as(order).contiguous())
    return (rank < k) & valid


# -- bits, quantisation, packing --------------------------------------------------------------


def check_levels(levels: Sequence[int]) -> tuple[int, ...]:
    """The bit-widths, sorted; each an integer in [2, 8] (codes are packed into bytes), distinct."""
    if (isinstance(levels, (str, bytes)) or not isinstance(levels, Sequence) or not levels
            or any(isinstance(b, bool) or not isinstance(b, int) or not 2 <= b <= 8 for b in levels)
            or len(set(levels)) != len(levels)):
        raise SpliceError(f"levels must be distinct integer bit-widths in [2, 8], like [2, 4, 8]; got {levels!r}")
    return tuple(sorted(levels))


def qmax(bits: torch.Tensor | int, symmetric: bool = True) -> torch.Tensor | int:
    """The largest code magnitude: 2^(b-1) - 1 symmetric (codes -q..q), 2^b - 1 affine (0..q)."""
    return 2 ** (bits - 1) - 1 if symmetric else 2 ** bits - 1


def step_error(bits: int, symmetric: bool = True) -> float:
    """A b-bit quantiser's squared step per unit of squared range: 1 / qmax(b)^2. The squared
    error of a row of n values with range m is about n m^2 step_error(b) / 12."""
    return 1.0 / qmax(bits, symmetric) ** 2


def allocate_bits(importances: torch.Tensor, sizes: torch.Tensor | None = None, *, mean_bits: float | None = None,
                  budget_bits: float | None = None, levels: Sequence[int] = LEVELS,
                  symmetric: bool = True) -> torch.Tensor:
    """Bits per row (long [R], each in `levels`), monotone in importance per value.

    Row r of `sizes[r]` values (default 1) with importance I_r costs about I_r step_error(b_r)
    in squared error at b_r bits. Every row starts at the lowest level; upgrades (one level up
    for one row) are taken greedily by error reduction per bit,

        key = (I_r / n_r) (e(b_k) - e(b_{k+1})) / (b_{k+1} - b_k),   cost = n_r (b_{k+1} - b_k),

    while the total bits stay within `budget_bits` (or `mean_bits` per value). e(b) is convex,
    so a row's higher step always ranks below its lower one: the taken upgrades form chains,
    and a row of larger I_r / n_r never gets fewer bits. Rows of zero importance stay lowest.
    """
    levels = check_levels(levels)
    importances = importances.detach().double().reshape(-1)
    sizes = torch.ones_like(importances) if sizes is None else sizes.detach().double().reshape(-1)
    if (mean_bits is None) == (budget_bits is None):
        raise SpliceError("allocate_bits takes one of mean_bits and budget_bits")
    budget = float(mean_bits) * float(sizes.sum()) if mean_bits is not None else float(budget_bits)
    spare = budget - levels[0] * float(sizes.sum())
    rows = importances.numel()
    steps = torch.zeros(rows, dtype=torch.long)
    if rows and spare > 0 and len(levels) > 1:
        density = importances / sizes.clamp(min=1)
        keys, costs = [], []
        for low, high in zip(levels, levels[1:], strict=False):
            keys.append(density * (step_error(low, symmetric) - step_error(high, symmetric)) / (high - low))
            costs.append(sizes * (high - low))
        key, cost = torch.cat(keys), torch.cat(costs)
        order = torch.argsort(key, descending=True, stable=True)  # ties: the lower step first
        taken = (torch.cumsum(cost[order], 0) <= spare) & (key[order] > 0)
        steps = torch.bincount(order[taken] % rows, minlength=rows)
    return torch.tensor(levels, dtype=torch.long)[steps]


@dataclass
class Quantized:
    """Rows [R, n] as unsigned codes (uint8, < 2^b_r), a float16 scale per row and (affine) an
    integer zero point per row: x_hat = scale_r (q - zero_r)."""

    codes: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor


def _fp16_scale(scale: torch.Tensor) -> torch.Tensor:
    """The scale as float16 rounded up (never a code beyond the range, so the error stays within
    half a step), kept inside float16's range (an all-zero row gets the smallest one)."""
    scale = scale.clamp(FP16_TINY, FP16_MAX)
    half = scale.to(torch.float16)
    return torch.where(half.float() < scale, torch.nextafter(half, torch.full_like(half, math.inf)), half)


def quantize(rows: torch.Tensor, bits: torch.Tensor | int, symmetric: bool = True) -> Quantized:
    """Uniform per-row quantisation of `rows` [R, n] at `bits` (per row, or one for all).

    symmetric: scale = max|x| / (2^(b-1) - 1), q = round(x / scale) + zero with zero = 2^(b-1) - 1
        (0 is exact, codes in [0, 2^b - 2]).
    affine: the range [min(x, 0), max(x, 0)] over 2^b - 1 steps, an integer zero point, codes in
        [0, 2^b - 1].
    Each row's error is at most half its step (the float16 scale is what decoding uses).
    """
    rows = rows.detach().float()
    bits = torch.as_tensor(bits, dtype=torch.long).expand(rows.shape[0])
    top = qmax(bits, symmetric).float()
    if symmetric:
        scales = _fp16_scale(rows.abs().amax(1) / top)
        zeros = top
        codes = torch.round(rows / scales.float()[:, None]).clamp(-top[:, None], top[:, None]) + zeros[:, None]
    else:
        low = rows.amin(1).clamp(max=0.0)
        scales = _fp16_scale((rows.amax(1).clamp(min=0.0) - low) / top)
        zeros = torch.round(-low / scales.float()).clamp(torch.zeros_like(top), top)
        codes = (torch.round(rows / scales.float()[:, None]) + zeros[:, None]).clamp(torch.zeros_like(rows),
                                                                                    top[:, None])
    return Quantized(codes.to(torch.uint8), scales, zeros.to(torch.uint8))


def dequantize(quantized: Quantized) -> torch.Tensor:
    """x_hat = scale_r (q - zero_r), float32 [R, n]."""
    return (quantized.codes.float() - quantized.zeros.float()[:, None]) * quantized.scales.float()[:, None]


def packed_bytes(count: int, bits: int) -> int:
    """The analytic size of `count` b-bit codes packed densely: ceil(count b / 8) bytes."""
    return (count * bits + 7) // 8


def pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Codes (< 2^bits, any shape, flattened) as a dense uint8 stream of `packed_bytes` bytes:
    code k's bit j is stream bit k*bits + j, least significant bits first."""
    flat = codes.reshape(-1)
    if flat.numel() and (int(flat.min()) < 0 or int(flat.max()) >= 1 << bits):
        raise SpliceError(f"codes must lie in [0, {1 << bits}) to pack at {bits} bits")
    stream = ((flat.to(torch.uint8)[:, None] >> torch.arange(bits, dtype=torch.uint8)) & 1).reshape(-1)
    stream = torch.cat([stream, stream.new_zeros(-stream.numel() % 8)]).reshape(-1, 8)
    return (stream << torch.arange(8, dtype=torch.uint8)).sum(1, dtype=torch.int16).to(torch.uint8)


def unpack(data: torch.Tensor, bits: int, count: int) -> torch.Tensor:
    """The first `count` b-bit codes of a `pack`ed stream (uint8 [count])."""
    if data.numel() != packed_bytes(count, bits):
        raise SpliceError(f"{count} codes at {bits} bits take {packed_bytes(count, bits)} bytes, got {data.numel()}")
    stream = ((data.to(torch.uint8)[:, None] >> torch.arange(8, dtype=torch.uint8)) & 1).reshape(-1)
    stream = stream[: count * bits].reshape(count, bits)
    return (stream << torch.arange(bits, dtype=torch.uint8)).sum(1, dtype=torch.int16).to(torch.uint8)


# -- a whole update as one payload ------------------------------------------------------------


def row_view(shape: Sequence[int]) -> tuple[int, int, bool]:
    """How a tensor of `shape` is cut into quantisation rows: (rows, values per row, transposed).

    A tensor is viewed as a matrix [shape[0], rest] (a vector or scalar: one row) and rows run
    along its longer side (transposed when shape[0] is the longer): LoRA's A [r, d_in] and
    B [d_out, r] both give r rows, one per rank component, so the 16-bit scale is shared by
    d values, not by r.
    """
    if len(shape) < 2:
        return 1, max(1, math.prod(shape)), False
    first, rest = shape[0], math.prod(shape[1:])
    return (rest, first, True) if first > rest else (first, rest, False)


def as_rows(tensor: torch.Tensor) -> torch.Tensor:
    """The tensor as its quantisation rows [R, n] (float32), per `row_view`."""
    rows, size, transposed = row_view(tuple(tensor.shape))
    values = tensor.detach().float()
    return (values.reshape(size, rows).T if transposed else values.reshape(rows, size)).contiguous()


def from_rows(rows: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    """`as_rows`' inverse."""
    _, _, transposed = row_view(tuple(shape))
    return (rows.T if transposed else rows).reshape(tuple(shape))


def index_bits(levels: Sequence[int]) -> int:
    """Bits of one row's entry in the level map: ceil(log2 |levels|) (0 for a single level)."""
    return (len(levels) - 1).bit_length()


def header_bytes(rows: int, levels: Sequence[int], symmetric: bool = True) -> int:
    """The level map (`index_bits` per row, packed), a float16 scale per row and, affine, a
    uint8 zero point per row."""
    return packed_bytes(rows, index_bits(levels)) + 2 * rows + (0 if symmetric else rows)


def payload_bytes(sizes: torch.Tensor, bits: torch.Tensor, levels: Sequence[int] = LEVELS,
                  symmetric: bool = True) -> int:
    """The analytic size of `encode_delta`'s payload for rows of `sizes` values at `bits`:

        header_bytes(R) + sum over levels b of ceil(b * (values of the rows at b) / 8).
    """
    levels = check_levels(levels)
    codes = sum(packed_bytes(int(sizes[bits == b].sum()), b) for b in levels)
    return header_bytes(int(sizes.numel()), levels, symmetric) + codes


@dataclass
class Encoded:
    """An update as one payload (uint8 bytes), with the bits and size of each row."""

    payload: torch.Tensor
    bits: torch.Tensor
    sizes: torch.Tensor


def encode_delta(delta: Mapping[str, torch.Tensor], *, levels: Sequence[int] = LEVELS, mean_bits: float | None = None,
                 budget_bytes: int | None = None, symmetric: bool = True) -> Encoded:
    """Quantise every tensor of `delta` per row (`row_view`) with bits from `allocate_bits` and
    pack it all in one uint8 payload of exactly `payload_bytes` bytes:

        [level index per row, packed][float16 scales][uint8 zero points, affine][codes at b_1][codes at b_2]...

    Rows run in name order, then row order; each level's codes are one dense stream. A row of
    n values and range m has importance n m^2: its squared error per unit of `step_error`, so
    the allocation spends bits where they remove the most squared error of the update.
    `mean_bits` (default 4) counts code bits per value; `budget_bytes` caps the whole payload
    (the header and each stream's padding reserved first; below the lowest level's size every
    row still gets the lowest level).
    """
    levels = check_levels(levels)
    bad = [name for name in sorted(delta) if not torch.isfinite(delta[name]).all()]
    if bad:  # the clamped float16 scales and codes would carry it as large finite numbers
        raise SpliceError(f"the update holds non-finite values ({', '.join(bad[:3])}"
                          f"{', ...' if len(bad) > 3 else ''}): it cannot be quantised; lower the learning rate "
                          "or set train.max_grad_norm")
    matrices = [as_rows(delta[name]) for name in sorted(delta)]
    sizes = torch.tensor([m.shape[1] for m in matrices for _ in range(m.shape[0])], dtype=torch.long)
    spans = torch.cat([_range_of(m, symmetric) for m in matrices]) if matrices else torch.zeros(0)
    importance = sizes * spans.double() ** 2
    if budget_bytes is not None:
        spare = 8 * (budget_bytes - header_bytes(int(sizes.numel()), levels, symmetric)) - 7 * len(levels)
        bits = allocate_bits(importance, sizes, budget_bits=spare, levels=levels, symmetric=symmetric)
    else:
        bits = allocate_bits(importance, sizes, mean_bits=4.0 if mean_bits is None else mean_bits, levels=levels,
                             symmetric=symmetric)
    offsets = [0, *torch.cumsum(torch.tensor([m.shape[0] for m in matrices], dtype=torch.long), 0).tolist()]
    row_bits = [bits[a:b] for a, b in zip(offsets, offsets[1:], strict=False)]
    quantized = [quantize(m, b, symmetric) for m, b in zip(matrices, row_bits, strict=True)]
    empty = torch.zeros(0, dtype=torch.uint8)
    parts = [pack(torch.searchsorted(torch.tensor(levels), bits), index_bits(levels)),
             torch.cat([empty.view(torch.float16), *[q.scales for q in quantized]]).view(torch.uint8)]
    if not symmetric:
        parts.append(torch.cat([empty, *[q.zeros for q in quantized]]))
    for level in levels:
        parts.append(pack(torch.cat([empty, *[q.codes[b == level].reshape(-1)
                                              for q, b in zip(quantized, row_bits, strict=True)]]), level))
    payload = torch.cat(parts)
    if budget_bytes is not None and payload.numel() > budget_bytes:
        raise SpliceError(f"options.budget_bytes {budget_bytes} is below this adapter's smallest upload, "
                          f"{payload.numel()} bytes (the header and every row at {levels[0]} bits): raise it")
    return Encoded(payload, bits, sizes)


def decode_delta(payload: torch.Tensor, like: Mapping[str, torch.Tensor], *, levels: Sequence[int] = LEVELS,
                 symmetric: bool = True) -> dict[str, torch.Tensor]:
    """`encode_delta`'s payload back as float32 tensors of `like`'s names and shapes (the
    decoder knows the layout from them; a payload of another size is refused)."""
    levels = check_levels(levels)
    names = sorted(like)
    views = [row_view(tuple(like[name].shape)) for name in names]
    rows = sum(v[0] for v in views)
    sizes = torch.tensor([v[1] for v in views for _ in range(v[0])], dtype=torch.long)
    payload = payload.reshape(-1).to(torch.uint8)
    cursor = packed_bytes(rows, index_bits(levels))
    if payload.numel() < header_bytes(rows, levels, symmetric):
        raise SpliceError(f"the payload has {payload.numel()} bytes, fewer than its header's "
                          f"{header_bytes(rows, levels, symmetric)}: it is not an update of this adapter")
    index = unpack(payload[:cursor], index_bits(levels), rows).long()
    if index.numel() and int(index.max()) >= len(levels):
        raise SpliceError(f"the payload's level map names level {int(index.max())} of {len(levels)}: it is not an "
                          "update of this adapter")
    bits = torch.tensor(levels, dtype=torch.long)[index]
    if payload.numel() != payload_bytes(sizes, bits, levels, symmetric):
        raise SpliceError(f"the payload has {payload.numel()} bytes; its level map says "
                          f"{payload_bytes(sizes, bits, levels, symmetric)}: it is not an update of this adapter")
    scales = payload[cursor: cursor + 2 * rows].clone().view(torch.float16)
    if not torch.isfinite(scales).all():
        raise SpliceError("the payload holds non-finite scales: it is not an update of this adapter "
                          "(corrupt or forged)")
    cursor += 2 * rows
    zeros = qmax(bits, True).to(torch.uint8) if symmetric else payload[cursor: cursor + rows]
    cursor += 0 if symmetric else rows
    streams = {}
    for level in levels:
        count = int(sizes[bits == level].sum())
        streams[level] = unpack(payload[cursor: cursor + packed_bytes(count, level)], level, count)
        cursor += packed_bytes(count, level)
    taken = dict.fromkeys(levels, 0)
    out, start = {}, 0
    for name, (n_rows, size, _) in zip(names, views, strict=True):
        here = slice(start, start + n_rows)
        codes = torch.zeros(n_rows, size, dtype=torch.uint8)
        for level in levels:
            chosen = bits[here] == level
            count = int(chosen.sum()) * size
            codes[chosen] = streams[level][taken[level]: taken[level] + count].reshape(-1, size)
            taken[level] += count
        out[name] = from_rows(dequantize(Quantized(codes, scales[here], zeros[here])), tuple(like[name].shape))
        start += n_rows
    return out


def _range_of(matrix: torch.Tensor, symmetric: bool) -> torch.Tensor:
    """Each row's quantisation range: max|x| (symmetric) or max(x, 0) - min(x, 0) (affine)."""
    if symmetric:
        return matrix.abs().amax(1)
    return matrix.amax(1).clamp(min=0.0) - matrix.amin(1).clamp(max=0.0)
