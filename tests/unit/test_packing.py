"""Packed batches: every example's loss in a packed row equals its loss alone, in Gemma-3 (full and sliding-window
layers) and GPT-NeoX, through the model's own loss and labelled_logits_loss; and the chunked labelled loss gives
the unchunked value and gradients."""
import pytest
import torch
import torch.nn.functional as F
from transformers import AutoConfig, AutoModelForCausalLM, Gemma3TextConfig

from helpers.collators import PackedRows, pack_rows
from helpers.losses import labelled_logits_loss
from helpers.trainer import REAL_TOKENS

PAD = 0


def _model(family: str, attention: str):
    if family == "gemma3":  # a window of 6 tokens, shorter than the examples: the sliding layers are exercised
        config = Gemma3TextConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
                                  num_key_value_heads=1, head_dim=32, vocab_size=96, sliding_window=6,
                                  layer_types=["sliding_attention", "full_attention"], final_logit_softcapping=30.0)
    else:
        config = AutoConfig.for_model("gpt_neox", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, vocab_size=96, rotary_pct=0.5,
                                      use_parallel_residual=True)
    config._attn_implementation = attention
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()


def _examples(lengths=(11, 5, 9, 14, 3, 8), seed=1):
    """Examples as helpers.data encodes answer_only rows: a prompt with labels -100, then the trained answer."""
    generator = torch.Generator().manual_seed(seed)
    examples = []
    for length in lengths:
        ids = torch.randint(1, 96, (length,), generator=generator).tolist()
        prompt = length // 3
        examples.append({"input_ids": ids, "attention_mask": [1] * length, "labels": [-100] * prompt + ids[prompt:]})
    return examples


@torch.no_grad()
def _alone_loss_sum(model, example) -> float:
    ids = torch.tensor([example["input_ids"]])
    labels = torch.tensor([example["labels"]])
    logits = model(input_ids=ids, use_cache=False).logits[0, :-1].float()
    return float(F.cross_entropy(logits, labels[0, 1:], ignore_index=-100, reduction="sum"))


@torch.no_grad()
def _packed_loss_sums(model, batch) -> list[float]:
    """The summed loss of each example inside the packed rows, cut out of the packed logits at its positions."""
    logits = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits.float()
    sums = []
    for row in range(batch["input_ids"].shape[0]):
        starts = (batch["position_ids"][row] == 0).nonzero().flatten().tolist() + [batch["input_ids"].shape[1]]
        for start, end in zip(starts, starts[1:]):
            labels = batch["labels"][row, start + 1:end]
            if (labels != -100).any():
                sums.append(float(F.cross_entropy(logits[row, start:end - 1], labels, ignore_index=-100,
                                                  reduction="sum")))
    return sums


def test_rows_hold_every_example_once_and_never_overflow():
    lengths = [7, 3, 12, 5, 5, 9, 1, 12]
    rows = pack_rows(lengths, 12)
    assert sorted(i for row in rows for i in row) == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in row) <= 12 for row in rows)
    assert len(rows) == 5  # 54 tokens: at least 5 rows of 12, and first-fit decreasing needs no more


def test_the_collator_packs_without_padding_between_examples_and_counts_real_tokens():
    examples = _examples()
    batch = PackedRows(PAD, row_tokens=20)(examples)
    assert set(batch) == {"input_ids", "labels", "position_ids", REAL_TOKENS}  # no attention mask
    assert batch[REAL_TOKENS] == sum(len(e["input_ids"]) for e in examples) == 50
    rows, width = batch["input_ids"].shape
    assert width <= 20 and rows * width - batch[REAL_TOKENS] < width  # the padding is a part of one row at most
    # each example's first label is -100 (the previous example's last token must not predict it), and positions
    # restart at 0 for each example and for the padding run
    starts = batch["position_ids"] == 0
    assert (batch["labels"][starts] == -100).all()
    assert int(starts.sum()) >= len(examples)


@pytest.mark.parametrize("family", ["gemma3", "gpt_neox"])
@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_each_examples_loss_in_a_packed_batch_equals_its_loss_alone(family, attention):
    model = _model(family, attention)
    examples = _examples()
    batch = PackedRows(PAD, row_tokens=20)(examples)
    packed = sorted(_packed_loss_sums(model, batch))
    alone = sorted(_alone_loss_sum(model, e) for e in examples)
    assert len(packed) == len(alone) == len(examples)
    assert packed == pytest.approx(alone, rel=1e-5, abs=1e-5)
    # and without the restarting positions the examples would see each other: the check can fail
    leaky = dict(batch, position_ids=torch.arange(batch["input_ids"].shape[1]).expand_as(batch["input_ids"]))
    assert sorted(_packed_loss_sums(model, dict(leaky, position_ids=batch["position_ids"]))) == pytest.approx(alone)
    logits_leaky = model(input_ids=leaky["input_ids"], position_ids=leaky["position_ids"], use_cache=False).logits
    logits_packed = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits
    assert not torch.allclose(logits_leaky, logits_packed, atol=1e-4)


@pytest.mark.parametrize("family", ["gemma3", "gpt_neox"])
def test_labelled_logits_loss_on_packed_rows_equals_the_models_loss_and_the_examples_alone(family):
    model = _model(family, "sdpa")
    examples = _examples()
    batch = PackedRows(PAD, row_tokens=20)(examples)
    inputs = {k: v for k, v in batch.items() if k != REAL_TOKENS}
    with torch.no_grad():
        labelled = labelled_logits_loss(model, inputs)
        theirs = model(**inputs, use_cache=False).loss
    trained = sum(sum(label != -100 for label in e["labels"][1:]) for e in examples)
    alone = sum(_alone_loss_sum(model, e) for e in examples) / trained
    assert float(labelled) == pytest.approx(float(theirs), rel=1e-5)
    assert float(labelled) == pytest.approx(alone, rel=1e-5)


@pytest.mark.parametrize("family", ["gemma3", "gpt_neox"])
@pytest.mark.parametrize("num_items", [None, 40])
def test_the_chunked_loss_has_the_unchunked_value_and_gradients(family, num_items):
    model = _model(family, "sdpa").train()
    batch = PackedRows(PAD, row_tokens=20)(_examples())
    inputs = {k: v for k, v in batch.items() if k != REAL_TOKENS}
    rows = int((inputs["labels"][:, 1:] != -100).sum())
    results = []
    for chunk_rows in (0, 7, rows):  # unchunked, chunks of 7 with a short last one, one chunk of every row
        model.zero_grad()
        torch.manual_seed(3)  # the same (absent) dropout draws either way
        loss = labelled_logits_loss(model, inputs, num_items, chunk_rows=chunk_rows)
        loss.backward()
        results.append((float(loss), [p.grad.clone() for p in model.parameters() if p.grad is not None]))
    (reference, grads), *others = results
    for value, other_grads in others:
        assert value == pytest.approx(reference, rel=1e-6)
        assert len(other_grads) == len(grads)
        assert all(torch.allclose(a, b, rtol=1e-5, atol=1e-7) for a, b in zip(other_grads, grads))
