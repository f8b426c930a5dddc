"""Answer metrics: repetition, Korean morpheme overlap, answer perplexity."""
import math

import pytest
import torch

from helpers.evaluation import answer_perplexity, distinct_n, morpheme_f1, morphemes, repeated_ngram_share


def test_repetition_metrics_tell_a_loop_from_varied_text():
    varied = list("abcdefgh")
    loop = list("abababab")
    assert distinct_n(varied, 2) == 1.0 and repeated_ngram_share(varied, 3) == 0.0
    assert distinct_n(loop, 2) == pytest.approx(2 / 7) and repeated_ngram_share(loop, 3) == pytest.approx(1 - 2 / 6)
    assert distinct_n([], 2) == 0.0


def test_morpheme_overlap_sees_through_particles():
    # Whitespace tokens share nothing here ("서울은" vs "서울이"); morphemes share the noun and the ending.
    assert "서울" in morphemes("서울은 한국의 수도입니다.")
    assert morpheme_f1("서울은 한국의 수도입니다.", "한국의 수도는 서울이에요.") > 0.5
    assert morpheme_f1("사과를 먹었다.", "비행기가 날아간다.") < 0.3
    assert morpheme_f1("같은 문장입니다.", "같은 문장입니다.") == pytest.approx(1.0)


def test_answer_perplexity_scores_answers_only_and_falls_as_the_model_fits(tiny_model_dir):
    from helpers.models import load_model

    model, tokenizer = load_model(str(tiny_model_dir), verbose=False)
    rows = [{"instruction": "질문", "context": "", "output": "답변입니다"}] * 3
    before = answer_perplexity(model, tokenizer, rows)
    assert math.isfinite(before) and before > 1
    # A few steps on exactly these answers must make them much more likely.
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    from helpers.data import encode_example
    example = encode_example(rows[0], tokenizer, "answer_only")
    ids = torch.tensor([example["input_ids"]])
    labels = torch.tensor([example["labels"]])
    model.train()
    for _ in range(20):
        loss = model(input_ids=ids, labels=labels).loss
        loss.backward(); optimizer.step(); optimizer.zero_grad()
    after = answer_perplexity(model, tokenizer, rows)
    assert after < before / 2


def test_answer_perplexity_labelled_positions_match_full_logits_and_fall_back(tiny_model_dir, monkeypatch):
    from helpers import losses
    from helpers.models import load_model

    model, tokenizer = load_model(str(tiny_model_dir), verbose=False)
    rows = [{"instruction": "질문 하나", "context": "", "output": "짧은 답"},
            {"instruction": "조금 더 긴 두 번째 질문입니다", "context": "참고 문장", "output": "이것은 더 긴 답변입니다"}]
    labelled = answer_perplexity(model, tokenizer, rows, batch_size=1)
    # A loss that disagrees with the model's own must be caught on the first batch and not used.
    monkeypatch.setattr(losses, "labelled_logits_loss", lambda *a, **k: torch.tensor(123.0))
    with pytest.warns(UserWarning, match="differs from the model's"):
        fallback = answer_perplexity(model, tokenizer, rows, batch_size=1)
    assert fallback == pytest.approx(labelled, rel=1e-5)


class _ScriptedModel(torch.nn.Module):
    """Stands in for a causal LM: generate() appends scripted tokens and records what it was given."""

    def __init__(self, scripts):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.scripts, self.calls = list(scripts), []

    def generate(self, input_ids, attention_mask, **kwargs):
        self.calls.append((input_ids.tolist(), attention_mask.tolist()))
        new = torch.tensor([self.scripts.pop(0) for _ in range(input_ids.shape[0])])
        return torch.cat([input_ids, new], dim=1)


def test_generate_answers_left_pads_cuts_at_eos_and_keeps_row_order(tokenizer):
    from helpers.evaluation import generate_answers

    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    word = tokenizer("답", add_special_tokens=False)["input_ids"][0]
    rows = [{"instruction": "짧은 질문", "output": ""}, {"instruction": "이것은 훨씬 더 길게 쓴 질문입니다", "output": ""}]
    model = _ScriptedModel([[word, eos, pad], [word, word, word]])
    answers, seconds = generate_answers(model, tokenizer, rows, max_new_tokens=3, batch_size=2)
    (ids, mask), = model.calls
    assert len(ids[0]) == len(ids[1]) and mask[1] == [1] * len(ids[1])
    n_pad = mask[0].index(1)
    assert n_pad > 0 and ids[0][:n_pad] == [ids[1][0]] * n_pad  # padded with the shared first token (BOS)
    assert [a["new_tokens"] for a in answers] == [2, 3]
    assert [a["ended_with_eos"] for a in answers] == [True, False]
    assert [a["question"] for a in answers] == [r["instruction"] for r in rows] and seconds >= 0


def test_left_pad_never_uses_eos_when_pad_is_eos(tokenizer):
    from helpers.evaluation import _left_pad_id

    tokenizer.pad_token = tokenizer.eos_token  # the blog recipe's tokenizer
    assert _left_pad_id(tokenizer, [[5, 6], [5, 7, 8]]) == 5
    assert _left_pad_id(tokenizer, [[5, 6], [9, 7, 8]]) is None  # no safe pad: one question at a time


def test_batched_greedy_generation_matches_one_at_a_time(tiny_model_dir):
    from helpers.evaluation import generate_answers
    from helpers.models import load_model

    model, tokenizer = load_model(str(tiny_model_dir), verbose=False)
    model.eval()
    rows = [{"instruction": q, "output": ""} for q in ("짧은 질문", "이것은 훨씬 더 길게 쓴 두 번째 질문입니다", "세 번째")]
    settings = dict(max_new_tokens=8, do_sample=False, repetition_penalty=1.2)
    batched, _ = generate_answers(model, tokenizer, rows, batch_size=3, **settings)
    single, _ = generate_answers(model, tokenizer, rows, batch_size=1, **settings)
    assert [a["answer"] for a in batched] == [a["answer"] for a in single]
    assert all(a["new_tokens"] for a in batched)


def test_answer_perplexity_works_for_a_tokenizer_without_pad(tiny_model_dir):
    # Llama-3 and polyglot-ko bases have no pad token; notebook 05 scores the base model with its own tokenizer.
    from helpers.models import load_model

    model, tokenizer = load_model(str(tiny_model_dir), verbose=False)
    rows = [{"instruction": "질문", "context": "", "output": "답변입니다"},
            {"instruction": "조금 더 긴 질문입니다", "context": "", "output": "조금 더 긴 답변입니다"}]
    with_pad = answer_perplexity(model, tokenizer, rows)
    tokenizer.pad_token = None
    assert tokenizer.pad_token_id is None
    without_pad = answer_perplexity(model, tokenizer, rows)
    assert without_pad == pytest.approx(with_pad, rel=1e-5)  # padding is masked by position: its id does not count
    assert tokenizer.pad_token_id is None  # the caller's tokenizer is left as it was


def test_generation_progress_ticks_once_a_token_and_changes_no_answer(tiny_model_dir):
    from transformers import StoppingCriteriaList

    from helpers.data import format_prompt
    from helpers.evaluation import TokenProgress, generate_answers, generation_kwargs
    from helpers.models import load_model

    model, tokenizer = load_model(str(tiny_model_dir), verbose=False)
    model.eval()
    row = {"instruction": "짧은 질문", "output": ""}
    ids = torch.tensor([tokenizer(format_prompt(row["instruction"], "", tokenizer))["input_ids"]])
    settings = generation_kwargs(tokenizer, max_new_tokens=5, do_sample=False)
    ticks = []
    bar = type("Bar", (), {"update": lambda self, n: ticks.append(n)})()
    plain = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), **settings)
    counted = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), min_new_tokens=5,
                             stopping_criteria=StoppingCriteriaList([TokenProgress(bar)]), **settings)
    assert len(ticks) == 5 and counted.shape[1] == ids.shape[1] + 5
    answer, = generate_answers(model, tokenizer, [row], max_new_tokens=5, batch_size=1, do_sample=False,
                               repetition_penalty=1.1)[0]
    new_ids = plain[0, ids.shape[1]:].tolist()
    new_ids = new_ids[:new_ids.index(tokenizer.eos_token_id) + 1] if tokenizer.eos_token_id in new_ids else new_ids
    assert answer["answer"] == tokenizer.decode(new_ids, skip_special_tokens=True).strip()
