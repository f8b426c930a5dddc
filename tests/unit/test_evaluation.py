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
    example = encode_example(rows[0], tokenizer, "fixed")
    ids = torch.tensor([example["input_ids"]])
    labels = torch.tensor([example["labels"]])
    model.train()
    for _ in range(20):
        loss = model(input_ids=ids, labels=labels).loss
        loss.backward(); optimizer.step(); optimizer.zero_grad()
    after = answer_perplexity(model, tokenizer, rows)
    assert after < before / 2
