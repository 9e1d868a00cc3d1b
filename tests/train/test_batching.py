"""Length-grouped batches (`splice.train.batching.LengthGroupedSampler` through `train_loader`)
and padding-free packing of causal-LM batches (`PackedCollator`, `check_packing`)."""

from __future__ import annotations

import random

import pytest
import torch
import transformers.masking_utils
from accelerate.data_loader import BatchSamplerShard, skip_first_batches
from torch.utils.data import BatchSampler
from transformers import AutoModelForCausalLM

from splice import SpliceError, assets
from splice.train import TrainConfig
from splice.train.batching import (
    LengthGroupedSampler,
    PackedCollator,
    check_packing,
    grouped_order,
    mega_batch_size,
    rows_in,
)
from splice.train.data import CausalLMCollator, ClassificationCollator, train_loader


def lengths(n: int, seed: int = 0, longest: int = 64) -> list[int]:
    rng = random.Random(seed)
    return [rng.randint(1, longest) for _ in range(n)]


def reviews(n: int, seed: int = 0) -> list[dict]:
    """Rows of 1 to 40 words: batches of them pad a lot unless grouped."""
    rng = random.Random(seed)
    return [{"text": " ".join(rng.choice(["good", "bad", "film", "plot"]) for _ in range(rng.randint(1, 40))),
             "label": rng.randint(0, 1)} for _ in range(n)]


def padding_share(lengths: list[int], order: list[int], batch_size: int) -> float:
    """The share of an epoch's token slots that are padding, rows taken in `order`, each batch
    padded to its longest row."""
    batches = [order[i: i + batch_size] for i in range(0, len(order), batch_size)]
    return 1.0 - sum(lengths) / sum(len(b) * max(lengths[r] for r in b) for b in batches)


def epoch(sampler_lengths: list[int], step_rows: int, seed: int) -> list[int]:
    return grouped_order(sampler_lengths, step_rows, torch.Generator().manual_seed(seed))


def steps_of(order: list[int], size: int) -> list[list[int]]:
    return [order[i: i + size] for i in range(0, len(order), size)]


@pytest.mark.parametrize(("n", "step_rows"), [(3892, 16), (1000, 7), (37, 8), (5, 16), (1, 1)])
def test_every_row_once_per_epoch_steps_cut_from_sorted_mega_batches_longest_first(n, step_rows):
    rows = lengths(n)
    order = epoch(rows, step_rows, seed=3)
    assert sorted(order) == list(range(n))
    size = mega_batch_size(n, step_rows)
    assert size % step_rows == 0  # mega-batches hold whole steps
    for group in steps_of(order, size):
        steps = steps_of(group, step_rows)
        assert all(len(step) == step_rows for step in steps[:-1])  # only the epoch's last step may be short
        for step in steps:
            assert [rows[i] for i in step] == sorted((rows[i] for i in step), reverse=True)
        # the steps are the mega-batch sorted by length and cut, in some order
        cut = steps_of(sorted((rows[i] for i in group), reverse=True), step_rows)
        assert sorted(tuple(rows[i] for i in step) for step in steps) == sorted(map(tuple, cut))
    assert rows[order[0]] == max(rows)  # the first batch is the epoch's largest


def test_steps_of_a_mega_batch_come_in_random_order():
    """Not long to short every fifty steps, as HF's sampler has it: the work per step is even."""
    rows = lengths(3892)
    longest = [max(rows[i] for i in step) for step in steps_of(epoch(rows, 16, seed=0), 16)]
    first_mega_batch = longest[1:50]
    assert first_mega_batch != sorted(first_mega_batch, reverse=True)
    halves = sum(longest[1:25]), sum(longest[25:50])
    assert abs(halves[0] - halves[1]) < 0.2 * max(halves)


def test_rows_of_one_length_keep_the_plain_shuffled_order(tokenizer):
    """Nothing to group: the loader gives exactly the batches of `shuffle=True`, every epoch."""
    rows = [{"text": f"word{i % 7} film", "label": i % 2} for i in range(40)]
    assert len(set(ClassificationCollator(tokenizer, 64).lengths(rows))) == 1
    grouped, plain = loader(rows, tokenizer, group_by_length=True), loader(rows, tokenizer, group_by_length=False)
    for _ in range(3):
        assert ids(grouped) == ids(plain)


def test_mega_batches_are_fifty_steps_as_hf():
    assert mega_batch_size(3892, 16) == 800  # Rotten Tomatoes, batch 16: 4 full mega-batches and one of 692
    assert mega_batch_size(200, 16) == 48  # few rows: 3 steps' rows, so that 4 mega-batches remain
    assert mega_batch_size(10, 16) == 16


def test_order_is_deterministic_per_seed_new_each_epoch_and_shuffled():
    rows = lengths(500)
    first, again, other = (LengthGroupedSampler(rows, 8, torch.Generator().manual_seed(s)) for s in (1, 1, 2))
    epochs = [list(first) for _ in range(3)]
    assert epochs == [list(again) for _ in range(3)]
    assert epochs[0] != epochs[1] != epochs[2] and list(other) != epochs[0]
    # within a mega-batch the rows are those of a random slice, not the dataset's shortest
    assert epochs[0][:8] != epochs[1][:8]


def test_grouping_cuts_rotten_tomatoes_padding(tokenizer):
    rows = assets.dataset("rotten_tomatoes").train
    counts = ClassificationCollator(tokenizer, 64).lengths(rows)
    plain = torch.randperm(len(rows), generator=torch.Generator().manual_seed(0)).tolist()
    assert padding_share(counts, plain, 16) > 0.35
    assert padding_share(counts, epoch(counts, 16, seed=0), 16) < 0.05


def test_lengths_are_what_the_collators_make(tokenizer):
    texts = reviews(20)
    classify = ClassificationCollator(tokenizer, max_length=24)
    assert classify.lengths(texts) == [int(classify([r])["attention_mask"].sum()) for r in texts]
    sft = [{"prompt": r["text"], "completion": " yes" * (i % 4 + 1)} for i, r in enumerate(texts)]
    causal = CausalLMCollator(tokenizer, max_length=30)
    assert causal.lengths(sft) == [len(causal.encode(r["prompt"], r["completion"])["input_ids"]) for r in sft]


def loader(rows: list[dict], tokenizer, seed: int = 42, processes: int = 1, **fields):
    config = TrainConfig(batch_size=4, seed=seed, output_dir="unused", **fields)
    return train_loader(rows, config, ClassificationCollator(tokenizer, 64), processes)


def ids(batches) -> list[list[tuple[int, ...]]]:
    """Each batch as the token ids of its rows, padding dropped."""
    return [[tuple(row[mask].tolist()) for row, mask in zip(b["input_ids"], b["attention_mask"].bool(), strict=True)]
            for b in batches]


def test_train_loader_groups_when_asked_and_resumes_from_the_epoch_state(tokenizer):
    rows = reviews(256)  # mega-batches of 64 rows (16 steps of 4)
    grouped, plain = loader(rows, tokenizer, group_by_length=True), loader(rows, tokenizer, group_by_length=False)
    assert isinstance(grouped.sampler, LengthGroupedSampler) and grouped.sampler.generator is grouped.generator
    steps = loader(rows, tokenizer, processes=2, grad_accum=3, group_by_length=True).sampler.step_rows
    assert steps == 4 * 3 * 2  # mega-batches count global optimizer steps
    assert sorted(sum(ids(grouped), [])) == sorted(sum(ids(plain), []))  # the same rows, other batches
    padded = [b["input_ids"].numel() for b in grouped], [b["input_ids"].numel() for b in plain]
    assert sum(padded[0]) < 0.8 * sum(padded[1])
    # what `checkpoint.batches` does on resume: the epoch's generator state back, the seen batches skipped
    state = grouped.generator.get_state()
    whole = ids(grouped)
    grouped.generator.set_state(state)
    assert ids(skip_first_batches(grouped, 5)) == whole[5:]
    assert ids(grouped) != whole  # the next epoch is a new order


def test_two_processes_share_the_order_of_one_with_their_global_batch():
    """accelerate deals process k the batches k, k+2, ... of one sampler's order; mega-batches
    count whole global batches, so one process at batch 8 sees the same steps."""
    rows = lengths(96, seed=5)
    one = list(BatchSampler(LengthGroupedSampler(rows, 8, torch.Generator().manual_seed(0)), 8, False))
    shards = [list(BatchSamplerShard(BatchSampler(LengthGroupedSampler(rows, 8, torch.Generator().manual_seed(0)),
                                                  4, False), num_processes=2, process_index=k)) for k in (0, 1)]
    assert [a + b for a, b in zip(*shards, strict=True)] == one


# -- packing --------------------------------------------------------------------------------------


def sft_rows(n: int) -> list[dict]:
    return [{"prompt": f"Question: {' '.join(['x'] * (i % 7 + 1))}?", "completion": " a b c"[: 2 * (i % 3) + 2]}
            for i in range(n)]


def test_packed_batch_has_the_padded_batchs_loss_and_gradients(tiny_llama_dir, tokenizer):
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, attn_implementation="sdpa")
    collate = CausalLMCollator(tokenizer, max_length=32)
    rows = sft_rows(6)
    padded, packed = collate(rows), PackedCollator(collate.encode)(rows)
    assert packed["input_ids"].shape[0] == 1 and packed["input_ids"].numel() == padded["attention_mask"].sum()
    assert rows_in(packed) == rows_in(padded) == 6
    losses, grads = [], []
    for batch in (padded, packed):
        model.zero_grad()
        loss = model(**batch).loss
        loss.backward()
        losses.append(loss.detach())
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    torch.testing.assert_close(losses[1], losses[0], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-4, atol=1e-6)
    check_packing(model, collate)  # passes: sdpa honours the restarts


def test_packing_is_refused_where_attention_ignores_the_restarts(tiny_llama_dir, tokenizer, monkeypatch):
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, attn_implementation="sdpa")
    monkeypatch.setattr(transformers.masking_utils, "find_packed_sequence_indices", lambda position_ids: None)
    with pytest.raises(SpliceError, match="packed sequences attend to each other"):
        check_packing(model, CausalLMCollator(tokenizer, 32))
    with pytest.raises(SpliceError, match="--tenants"):
        check_packing(model, CausalLMCollator(tokenizer, 32), tenant=True)
