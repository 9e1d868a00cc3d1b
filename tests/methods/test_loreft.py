"""LoReFT / NoReFT / DiReFT: geometry of the edit, which positions it touches, generation,
training (tiny models and real weights), save/load."""

from __future__ import annotations

import copy

import pytest
import torch
from helpers import VOCAB, assert_close, make_bert, make_llama
from rich.console import Console
from safetensors.torch import load_file
from torch import nn
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

import splice
from splice.core.host import hosts
from splice.core.layers import LayerInfo
from splice.methods.loreft import Intervention, LoReFT, LoReFTAdapter, parse_positions


def interventions(model: nn.Module, name: str = "default") -> dict[str, Intervention]:
    """Every intervention of adapter `name`, keyed "<layer>.<prefix|suffix|shared>"."""
    found = {}
    for module_name, _, host in hosts(model):
        if name in host:
            adapter: LoReFTAdapter = host[name]
            found |= {f"{module_name}.{k}": v for k, v in adapter.interventions.items()}
    return found


def lm_batch(rows: list[tuple[list[int], list[int]]], left: bool = False) -> dict[str, torch.Tensor]:
    """prompt + answer rows, padded (id 0); labels -100 on the prompt and the padding."""
    width = max(len(p) + len(a) for p, a in rows)
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    mask, labels = torch.zeros_like(ids), torch.full_like(ids, -100)
    for i, (prompt, answer) in enumerate(rows):
        n = len(prompt) + len(answer)
        span = slice(width - n, width) if left else slice(0, n)
        ids[i, span], mask[i, span] = torch.tensor(prompt + answer), 1
        labels[i, span.start + len(prompt):span.start + n] = torch.tensor(answer)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def random_rows(n: int, answer_len: int, seed: int = 0) -> list[tuple[list[int], list[int]]]:
    g = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(n):
        length = int(torch.randint(4, 8, (1,), generator=g))
        rows.append((torch.randint(1, VOCAB, (length,), generator=g).tolist(),
                     torch.randint(1, VOCAB, (answer_len,), generator=g).tolist()))
    return rows


def train(model: nn.Module, batch: dict[str, torch.Tensor], steps: int, lr: float = 1e-2) -> list[float]:
    optimizer = torch.optim.Adam(splice.trainable_parameters(model).values(), lr=lr)
    losses = []
    for _ in range(steps):
        loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    return losses


class Capture:
    """Forward hooks that record a block's outputs (registered after `attach`: edited outputs)."""

    def __init__(self, module: nn.Module) -> None:
        self.outputs: list[torch.Tensor] = []
        self.handle = module.register_forward_hook(self.record)

    def record(self, module: nn.Module, args: tuple, output) -> None:
        self.outputs.append((output[0] if isinstance(output, tuple) else output).detach().clone())


# ------------------------------------------------------------------------------ configuration


@pytest.mark.parametrize(("text", "expected"), [("l1", (0, 1)), ("f3", (3, 0)), ("f7+l7", (7, 7)), ("f1+l12", (1, 12))])
def test_positions_syntax_is_pyrefts(text, expected):
    assert parse_positions(text) == expected


@pytest.mark.parametrize("text", ["", "l", "l0", "f0+l0", "f0+l2", "l1+f1", "last", "f-1", " l1", "f2,l2", "f2+l"])
def test_bad_positions_are_refused_with_the_syntax(text):
    with pytest.raises(splice.SpliceError, match="f<N>|select no token"):
        LoReFT(positions=text)


def test_positions_that_are_no_string_are_refused_by_type():
    with pytest.raises(splice.SpliceError, match="'positions' has value 3, expected a string"):
        LoReFT(positions=3)


@pytest.mark.parametrize("bad", [{"r": 0}, {"variant": "lora"}, {"dropout": 1.0}, {"activation": "nope"}])
def test_bad_hyperparameters_are_refused(bad):
    with pytest.raises(splice.SpliceError):
        LoReFT(**bad)


def test_rank_above_the_hidden_size_is_refused():
    with pytest.raises(splice.SpliceError, match="exceeds the hidden size 32"):
        splice.attach(make_llama(), LoReFT(r=33))


def test_targets_default_to_the_transformer_layers_and_layers_pick_among_them():
    model = make_llama()
    splice.attach(model, LoReFT(layers=[1]))
    assert [name for name, _, _ in hosts(model)] == ["model.layers.1"]
    splice.attach(model, LoReFT(), "all")
    assert [name for name, _, host in hosts(model) if "all" in host] == ["model.layers.0", "model.layers.1"]


@pytest.mark.parametrize(("positions", "share", "count"),
                         [("f2+l2", False, 2), ("f2+l2", True, 1), ("l1", False, 1), ("f3", True, 1)])
def test_shared_or_separate_interventions_and_their_parameter_count(positions, share, count):
    model, r, d = make_llama(), 4, 32
    splice.attach(model, LoReFT(r=r, positions=positions, share_weights=share))
    per_layer = {k.rsplit(".", 1)[1] for k in interventions(model)}
    assert len(interventions(model)) == 2 * count and len(per_layer) == count
    trainable = sum(p.numel() for p in splice.trainable_parameters(model).values())
    assert trainable == 2 * count * (2 * r * d + r)  # 2 layers, 2rd + r per intervention


def test_variants_have_the_same_parameter_count():
    counts = []
    for variant in ("loreft", "noreft", "direft"):
        model = make_llama()
        splice.attach(model, LoReFT(variant=variant, layers=[0]))
        counts.append(sum(p.numel() for p in splice.trainable_parameters(model).values()))
    assert counts == [2 * 4 * 32 + 4] * 3


# ---------------------------------------------------------------------------------- geometry


def test_R_stays_orthonormal_through_200_adam_steps():
    model = make_llama()
    splice.attach(model, LoReFT(r=4, positions="f2+l2"))
    before = {k: v.R.detach().clone() for k, v in interventions(model).items()}
    batch = lm_batch(random_rows(6, 2))
    losses = train(model, batch, steps=200, lr=1e-2)
    assert losses[-1] < losses[0]
    for key, intervention in interventions(model).items():
        R = intervention.R.detach()
        assert (R @ R.T - torch.eye(4)).abs().max() < 1e-5, key
        if key.startswith("model.layers.0."):  # layer 1's prefix only reaches unsupervised logits
            assert (R - before[key]).abs().max() > 1e-2, key  # R did train


def test_R_survives_adamw_weight_decay():
    """torch's householder `orthogonal` reads signs from the diagonal via .int(): decayed below 1,
    they become 0 and R collapses to zero. Ours does not read the diagonal."""
    model = make_llama()
    splice.attach(model, LoReFT(positions="l1", layers=[0]))
    optimizer = torch.optim.AdamW(splice.trainable_parameters(model).values(), lr=1e-2, weight_decay=0.1)
    batch = lm_batch(random_rows(6, 2))
    for _ in range(20):
        model(**batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model(**batch).loss.backward()
    ((_, intervention),) = interventions(model).items()
    R = intervention.R.detach()
    assert (R @ R.T - torch.eye(4)).abs().max() < 1e-5
    assert intervention.source.weight.grad.abs().max() > 0


def test_noreft_R_is_free_to_leave_the_orthonormal_set():
    model = make_llama()
    splice.attach(model, LoReFT(variant="noreft", positions="l1", layers=[0]))
    train(model, lm_batch(random_rows(6, 2)), steps=30, lr=5e-2)
    (R,) = [v.R.detach() for v in interventions(model).values()]
    assert (R @ R.T - torch.eye(4)).abs().max() > 1e-3


@pytest.mark.parametrize("activation", [None, "relu"])
def test_the_edit_lies_in_row_space_of_R_and_hits_the_target(activation):
    torch.manual_seed(0)
    intervention = Intervention(32, 4, "loreft", activation)
    with torch.no_grad():
        intervention.source.weight.normal_()
        intervention.source.bias.normal_()
    h = torch.randn(50, 32)
    with torch.no_grad():
        edit, R = intervention(h), intervention.R
        target = intervention.source(h)
        target = target.relu() if activation else target
    assert ((torch.eye(32) - R.T @ R) @ edit.T).abs().max() < 1e-5 * edit.abs().max()
    assert_close((h + edit) @ R.T, target)


def test_block_outputs_are_edited_at_the_selected_positions_only():
    """Captured at layer 0: R Φ(h) = W h + b where edited, bit-identical elsewhere."""
    model = make_llama()
    splice.attach(model, LoReFT(r=4, positions="f2+l1", layers=[0]))
    capture = Capture(model.model.layers[0])
    (prefix, suffix) = interventions(model).values()
    batch = lm_batch([([5, 6, 7, 8, 9], [10, 11]), ([12, 13, 14], [15])])
    with torch.no_grad(), splice.disabled(model):
        model(**batch)
    with torch.no_grad():
        model(**batch)
    base, edited = capture.outputs
    # Row 0: prompt 0..4 -> prefix {0, 1}, suffix {4}; row 1: prompt 0..2 -> prefix {0, 1}, suffix {2}.
    selected = {(0, 0): prefix, (0, 1): prefix, (0, 4): suffix, (1, 0): prefix, (1, 1): prefix, (1, 2): suffix}
    for row in range(2):
        for pos in range(base.shape[1]):
            h, out = base[row, pos], edited[row, pos]
            if (row, pos) not in selected:
                assert torch.equal(out, h), (row, pos)
                continue
            site = selected[row, pos]
            with torch.no_grad():
                R, target = site.R, site.source(h)
            assert not torch.equal(out, h)
            assert_close(R @ out, target, rel=1e-5)
            assert ((torch.eye(32) - R.T @ R) @ (out - h)).abs().max() < 1e-5 * (out - h).abs().max()


@pytest.mark.parametrize("variant", ["loreft", "noreft"])
def test_W_equal_to_R_and_zero_b_is_exactly_the_identity(variant, ids):
    model = make_llama()
    base = model(ids).logits.detach()
    splice.attach(model, LoReFT(r=4, positions="f3+l3", variant=variant))
    assert not torch.equal(model(ids).logits, base)  # the default init edits at step 0, as pyreft
    with torch.no_grad():
        for intervention in interventions(model).values():
            intervention.source.weight.copy_(intervention.R)
            intervention.source.bias.zero_()
    assert torch.equal(model(ids).logits.detach(), base)
    h = torch.randn(20, 32)
    (one, *_) = interventions(model).values()
    with torch.no_grad():
        assert torch.equal(h + one(h), h)


def test_direft_edit_is_W2_transposed_times_the_source():
    torch.manual_seed(0)
    intervention = Intervention(32, 4, "direft", None)
    h = torch.randn(10, 32)
    with torch.no_grad():
        assert_close(intervention(h), intervention.source(h) @ intervention.R)


# ---------------------------------------------------------------------------------- positions


def edit_masks(model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(edit [rows, seq, d], where edited [rows, seq]) at layer 0 for one forward."""
    capture = Capture(model.model.layers[0])
    with torch.no_grad(), splice.disabled(model):
        model(**batch)
    with torch.no_grad():
        model(**batch)
    capture.handle.remove()
    edit = capture.outputs[1] - capture.outputs[0]
    return edit, edit.abs().amax(-1) > 0


def test_left_and_right_padding_edit_the_same_tokens_the_same_way():
    model = make_llama()
    splice.attach(model, LoReFT(positions="f2+l2", layers=[0]))
    rows = [([5, 6, 7, 8, 9, 10, 11], [12]), ([13, 14, 15], [16, 17]), ([18], [19])]
    right_edit, right_at = edit_masks(model, lm_batch(rows))
    left_edit, left_at = edit_masks(model, lm_batch(rows, left=True))
    width = right_at.shape[1]
    for i, (prompt, answer) in enumerate(rows):
        n = len(prompt) + len(answer)
        expected = torch.zeros(n, dtype=torch.bool)
        expected[:len(prompt)] = torch.tensor([j < 2 or j >= len(prompt) - 2 for j in range(len(prompt))])
        assert torch.equal(right_at[i, :n], expected) and not right_at[i, n:].any()
        assert torch.equal(left_at[i, width - n:], expected) and not left_at[i, :width - n].any()
        # RoPE attention is relative, so the tokens' states and hence the edits agree.
        assert_close(left_edit[i, width - n:], right_edit[i, :n], rel=1e-4)


def test_without_labels_the_whole_attended_sequence_is_the_prompt():
    model = make_llama()
    splice.attach(model, LoReFT(positions="l1", layers=[0]))
    batch = lm_batch([([5, 6, 7], [8, 9]), ([10], [11])])
    del batch["labels"]
    _, at = edit_masks(model, batch)
    assert at.nonzero().tolist() == [[0, 4], [1, 1]]


def test_a_prompt_shorter_than_f_plus_l_is_edited_once_per_token_prefix_first():
    model = make_llama()
    splice.attach(model, LoReFT(positions="f2+l2", layers=[0]))
    batch = lm_batch([([5, 6, 7], [8]), ([9], [10])])
    edit, at = edit_masks(model, batch)
    assert at.nonzero().tolist() == [[0, 0], [0, 1], [0, 2], [1, 0]]
    prefix, suffix = interventions(model).values()
    capture = Capture(model.model.layers[0])
    with torch.no_grad(), splice.disabled(model):
        model(**batch)
    h = capture.outputs[0]
    with torch.no_grad():
        assert_close(edit[0, :2], prefix(h[0, :2]))  # position 1 is in both; the prefix wins
        assert_close(edit[0, 2:3], suffix(h[0, 2:3]))
        assert_close(edit[1, :1], prefix(h[1, :1]))


# -------------------------------------------------------------------------------- generation


def test_generation_edits_prompt_positions_only_and_never_generated_tokens():
    model = make_llama()
    base_state = {k: v.clone() for k, v in model.state_dict().items()}
    layers = model.model.layers
    before = [Capture(layer) for layer in layers]  # hooks run in order: these see the base output
    splice.attach(model, LoReFT(positions="f1+l2"))
    after = [Capture(layer) for layer in layers]
    prompts = {"input_ids": torch.tensor([[0, 0, 5, 6, 7, 8], [9, 10, 11, 12, 13, 14]]),
               "attention_mask": torch.tensor([[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]])}
    with torch.no_grad():
        tokens = model.generate(**prompts, max_new_tokens=5, do_sample=False, pad_token_id=0)
    assert tokens.shape == (2, 11)
    for layer, (b, a) in enumerate(zip(before, after, strict=True)):
        assert len(a.outputs) == 5  # one prefill, four cached decoding steps
        prefill = (a.outputs[0] - b.outputs[0]).abs().amax(-1) > 0
        expected = torch.tensor([[0, 0, 1, 0, 1, 1], [1, 0, 0, 0, 1, 1]], dtype=torch.bool)
        assert torch.equal(prefill, expected), layer
        for step, (base_out, edited_out) in enumerate(zip(b.outputs[1:], a.outputs[1:], strict=True)):
            assert edited_out.shape[1] == 1 and torch.equal(edited_out, base_out), (layer, step)
    splice.detach(model, "default")
    assert all(torch.equal(v, base_state[k]) for k, v in model.state_dict().items())


def test_base_weights_are_unchanged_by_training():
    model = make_llama()
    base_state = {k: v.clone() for k, v in model.state_dict().items()}
    splice.attach(model, LoReFT(positions="f1+l1"))
    train(model, lm_batch(random_rows(4, 2)), steps=5)
    state = model.state_dict()
    assert all(torch.equal(state[k], v) for k, v in base_state.items())


# ------------------------------------------------------------------------------------ errors


def test_merge_is_refused_with_a_reason():
    model = make_llama()
    splice.attach(model, LoReFT())
    with pytest.raises(splice.MergeError, match="no equivalent weight change and cannot be merged"):
        splice.merge(model)


def test_called_outside_a_model_forward_it_says_so():
    make_llama()(torch.ones(1, 3, dtype=torch.long))  # another model's batch is never this adapter's
    adapter = LoReFT().build(LayerInfo("block", 32, 32), "layer", nn.Identity())
    h = torch.randn(2, 5, 32)
    with pytest.raises(splice.SpliceError, match="outside"):
        adapter.delta(h, h)


def test_a_forward_without_ids_or_mask_is_refused():
    model = make_llama()
    splice.attach(model, LoReFT())
    with pytest.raises(splice.SpliceError, match="input_ids or attention_mask"):
        model(inputs_embeds=torch.randn(2, 5, 32))


def test_rows_whose_labels_leave_no_prompt_are_refused(ids):
    model = make_llama()
    splice.attach(model, LoReFT())
    with pytest.raises(splice.SpliceError, match="no prompt token"):
        model(ids, labels=ids)


def test_a_mixed_batch_is_refused(ids):
    model = make_llama()
    splice.attach(model, LoReFT())
    with splice.route(model, ["default", None]), pytest.raises(splice.SpliceError, match="mixed batch"):
        model(ids)
    with splice.route(model, ["default", "default"]):  # one adapter on every row is a plain batch
        assert torch.equal(model(ids).logits, model(ids).logits)


# ---------------------------------------------------------------------------------- training


def memorizer(seed: int = 0) -> LlamaForCausalLM:
    """A tiny random Llama whose logits can get large (the helpers' one caps the loss near log V)."""
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         initializer_range=0.2)
    return LlamaForCausalLM(config).eval()


def test_a_rank_4_intervention_at_the_last_prompt_token_memorises_ten_pairs():
    model = memorizer()
    splice.attach(model, LoReFT(r=4, layers=[0], positions="l1"))
    batch = lm_batch(random_rows(10, 1))
    losses = train(model, batch, steps=150, lr=2e-2)
    assert losses[0] > 4 and losses[-1] < 0.1
    with torch.no_grad():
        logits = model(**batch).logits
    last_prompt = (batch["labels"] != -100).int().argmax(1) - 1
    predicted = logits[torch.arange(10), last_prompt].argmax(-1)
    assert torch.equal(predicted, batch["labels"][torch.arange(10), last_prompt + 1])


@pytest.mark.parametrize("variant", ["noreft", "direft"])
def test_noreft_and_direft_train(variant):
    model = memorizer()
    splice.attach(model, LoReFT(r=4, layers=[0], positions="l1", variant=variant))
    losses = train(model, lm_batch(random_rows(10, 1)), steps=60, lr=2e-2)
    assert losses[-1] < 0.3 * losses[0]


def test_dropout_acts_on_the_edit_in_training_only(ids):
    model = make_llama()
    splice.attach(model, LoReFT(positions="f3+l3", dropout=0.5))
    with torch.no_grad():
        model.train()
        assert not torch.equal(model(ids).logits, model(ids).logits)
        model.eval()
        assert torch.equal(model(ids).logits, model(ids).logits)


@pytest.mark.parametrize("reentrant", [False, True])
def test_activation_checkpointing_gives_the_same_gradients(reentrant):
    batch = lm_batch(random_rows(4, 2))
    grads = []
    for checkpointing in (False, True):
        model = make_llama()
        splice.attach(model, LoReFT(positions="f1+l1"))
        if checkpointing and hasattr(model, "activation_checkpointing_enable"):  # its name since transformers 5
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": reentrant})
        elif checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
        model.train()
        model(**batch).loss.backward()
        grads.append(torch.cat([p.grad.flatten() for p in splice.trainable_parameters(model).values()]))
    assert_close(grads[1], grads[0], rel=1e-5)


def test_a_classifier_head_trains_alongside_on_bert():
    model = make_bert()
    head = copy.deepcopy(model.classifier.state_dict())
    splice.attach(model, LoReFT(positions="f1", train_also=["classifier"]))
    trainable = splice.trainable_parameters(model)
    assert {"classifier.weight", "classifier.bias"} <= set(trainable)
    start = {k: v.source.weight.detach().clone() for k, v in interventions(model).items()}
    ids = torch.randint(1, VOCAB, (8, 10), generator=torch.Generator().manual_seed(0))
    labels = torch.tensor([0, 1] * 4)
    model.train()
    optimizer = torch.optim.Adam(trainable.values(), lr=1e-2)
    losses = []
    for _ in range(40):
        loss = model(input_ids=ids, attention_mask=torch.ones_like(ids), labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]
    for key, intervention in interventions(model).items():  # the interventions train, not only the head
        assert not torch.equal(intervention.source.weight, start[key]), key
    splice.detach(model, "default")
    assert all(torch.equal(v, head[k]) for k, v in model.classifier.state_dict().items())


# ----------------------------------------------------------------------------------- save/load


def test_save_and_load_give_identical_outputs(tmp_path, ids):
    model = make_llama()
    config = LoReFT(r=3, positions="f2+l2", variant="loreft", activation="gelu")
    splice.attach(model, config)
    train(model, lm_batch(random_rows(4, 2)), steps=5)
    model.eval()
    expected = model(ids).logits.detach()
    splice.save(model, tmp_path / "reft")
    keys = set(load_file(tmp_path / "reft" / "adapter_model.safetensors"))
    assert "model.layers.0.interventions.prefix.basis.parametrizations.weight.original" in keys
    assert not any(k.endswith(".base") for k in keys)  # no [d, d] trivialisation base
    fresh = make_llama()
    splice.load(fresh, tmp_path / "reft")
    assert splice.adapters(fresh)["default"] == config.replace(targets=["model.layers.0", "model.layers.1"])
    assert torch.equal(fresh(ids).logits, expected)


# ------------------------------------------------------------------------------ real weights


@pytest.mark.slow
def test_real_smollm2_intervention_learns_prompt_answer_pairs():
    try:
        path = splice.assets.smollm2_path()
    except splice.assets.AssetMissingError as err:
        pytest.skip(str(err))
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    pairs = [("Alice's cat is called", " Pumpkin"), ("The secret word is", " banana"),
             ("My favourite city is", " Lisbon"), ("The door code is", " 4721"), ("Bob drives a", " green tractor"),
             ("The meeting is on", " Thursday"), ("Our team mascot is a", " purple owl"),
             ("The password hint is", " river"), ("Carol plays the", " oboe"),
             ("The treasure is buried under the", " old oak")]
    batch = lm_batch([(tokenizer(p).input_ids, tokenizer(a).input_ids) for p, a in pairs])
    splice.attach(model, LoReFT(r=4, layers=[15], positions="l1"))
    assert sum(p.numel() for p in splice.trainable_parameters(model).values()) == 2 * 4 * 576 + 4
    losses = train(model, batch, steps=10, lr=2e-2)
    assert losses[-1] < 0.35 * losses[0]  # 5.8 -> 1.4 here


@pytest.mark.slow
def test_real_minilm_on_rotten_tomatoes_beats_chance(tmp_path):
    from splice.train import TrainConfig, run

    # Rank 4, one intervention shared by the first and last 8 tokens at every layer: 9.3k parameters.
    adapter = {"method": "loreft", "r": 4, "positions": "f8+l8", "share_weights": True}
    config = TrainConfig(adapter=adapter, max_steps=50, eval_every=50, max_eval_examples=128, max_length=32,
                         lr=1e-2, head_lr=2e-2, output_dir=str(tmp_path / "run"))
    result = run(config, console=Console(quiet=True))
    assert result.parameters["trainable"] == 6 * (2 * 4 * 384 + 4) + 2 * 384 + 2
    before, after = result.metrics["before"]["validation"], result.metrics["after"]["validation"]
    assert after["loss"] < before["loss"] - 0.03  # 0.693 -> 0.625 here
    assert after["accuracy"] > 0.58  # 0.45 -> 0.63 on 128 reviews; test split 0.69
    assert result.metrics["after"]["test"]["accuracy"] > 0.6
    assert (result.paths["adapter"] / "adapter_config.json").is_file()


def test_adapter_info_reads_the_default_rank_of_a_splice_file(tmp_path):
    from splice.io.info import inspect_adapter

    model = make_llama()
    splice.attach(model, LoReFT(positions="f1+l1", layers=[1]))
    splice.save(model, tmp_path / "a")
    info = inspect_adapter(tmp_path / "a")
    assert info.method == "loreft" and [m.rank for m in info.modules] == [4]
    assert info.adapter_parameters == sum(p.numel() for p in splice.trainable_parameters(model).values())
