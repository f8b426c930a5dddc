"""Generation and evaluation: the KoAlpaca ``ask()`` flow with timing, and answer metrics."""
from __future__ import annotations

import copy
import time

import torch
from tqdm.auto import tqdm
from transformers import StoppingCriteria, StoppingCriteriaList, TextStreamer


class TimingStreamer(TextStreamer):
    """Prints tokens as they arrive (when ``echo``) and records the time of the first generated token."""

    def __init__(self, tokenizer, echo: bool = True, **kwargs):
        super().__init__(tokenizer, skip_prompt=True, skip_special_tokens=True, **kwargs)
        self.echo = echo
        self.first_token_time = None
        self._prompt_seen = False

    def put(self, value):
        if self._prompt_seen and self.first_token_time is None:
            self.first_token_time = time.perf_counter()
        self._prompt_seen = True
        super().put(value)

    def on_finalized_text(self, text: str, stream_end: bool = False):
        if self.echo:
            super().on_finalized_text(text, stream_end)


class TokenProgress(StoppingCriteria):
    """Advances a progress bar by one at every token that ``generate`` adds (to every row of a batch at once);
    it never stops generation, so the answers are the same with or without it."""

    def __init__(self, bar):
        self.bar = bar

    def __call__(self, input_ids, scores, **kwargs) -> torch.BoolTensor:
        self.bar.update(1)
        return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)


def generation_kwargs(tokenizer, max_new_tokens=128, temperature=0.7, top_p=0.9, repetition_penalty=1.1,
                      do_sample=True) -> dict:
    kwargs = {"max_new_tokens": max_new_tokens, "do_sample": do_sample, "repetition_penalty": repetition_penalty,
              "eos_token_id": tokenizer.eos_token_id,
              "pad_token_id": tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id}
    if do_sample:
        kwargs.update(temperature=temperature, top_p=top_p)
    return kwargs


@torch.no_grad()
def ask(model, tokenizer, instruction: str, context: str = "", template: str = "koalpaca", stream: bool = True,
        seed: int | None = 42, **sampling) -> dict:
    """Answer one question with the KoAlpaca prompt; return the answer with time to first token and tokens/s.

    sampling: max_new_tokens, temperature, top_p, repetition_penalty, do_sample (see generation_kwargs).
    """
    from helpers.data import format_prompt

    prompt = format_prompt(instruction, context, tokenizer, template)
    inputs = tokenizer(prompt, return_tensors="pt").to(next(model.parameters()).device)
    streamer = TimingStreamer(tokenizer, echo=stream)
    if seed is not None:
        torch.manual_seed(seed)
    if stream:
        print(f"Q: {instruction}\nA:", end="", flush=True)
    start = time.perf_counter()
    output = model.generate(**inputs, streamer=streamer, **generation_kwargs(tokenizer, **sampling))
    total = time.perf_counter() - start
    new_ids = output[0, inputs["input_ids"].shape[1]:]
    n_new = int(new_ids.shape[0])
    ended = bool(n_new and new_ids[-1].item() == tokenizer.eos_token_id)
    first = (streamer.first_token_time - start) if streamer.first_token_time else total
    decode_time = max(total - first, 1e-9)
    return {"question": instruction, "answer": tokenizer.decode(new_ids, skip_special_tokens=True).strip(),
            "new_tokens": n_new, "ended_with_eos": ended, "time_to_first_token_s": round(first, 3),
            "tokens_per_s": round((n_new - 1) / decode_time, 2) if n_new > 1 else 0.0,
            "total_s": round(total, 3)}


def ask_many(model, tokenizer, rows, desc: str = "answering", **settings) -> list[dict]:
    """:func:`ask` for each row (``instruction`` and ``context``), one at a time and not streamed, with a
    progress bar; settings: template, seed and the sampling arguments of :func:`ask`."""
    return [ask(model, tokenizer, row["instruction"], context=row.get("context", ""), stream=False, **settings)
            for row in tqdm(rows, desc=desc, leave=False)]


# --------------------------------------------------------------------------------------------- metrics

@torch.no_grad()
def answer_perplexity(model, tokenizer, rows, template: str = "koalpaca", batch_size: int = 8) -> float:
    """exp(mean loss over answer tokens and the EOS), prompt tokens excluded: how well the model predicts the
    reference answers and where they end.

    Vocabulary logits are computed only at answer positions (helpers.losses.labelled_logits_loss: 40% less time
    on the embedded model, where the 262k-entry output layer is most of the work); the first batch is also scored
    through the model's own logits, and a mismatch falls back to those with a warning.
    """
    import warnings

    from helpers.data import encode_example, make_collator
    from helpers.losses import labelled_logits_loss

    model.eval()
    tokenizer = padding_tokenizer(tokenizer)
    collate = make_collator(tokenizer, "answer_only")
    device = next(model.parameters()).device
    total_loss, total_tokens = 0.0, 0
    examples = [encode_example(row, tokenizer, "answer_only", template, max_length=4096) for row in rows]
    examples.sort(key=lambda e: len(e["input_ids"]))  # similar lengths together: little padding to compute
    labelled_only = None  # decided on the first batch
    for start in tqdm(range(0, len(examples), batch_size), desc="answer perplexity", unit="batch", leave=False):
        batch = {k: v.to(device) for k, v in collate(examples[start:start + batch_size]).items()}
        scored = int((batch["labels"][:, 1:] != -100).sum())
        if labelled_only is not False:
            loss_sum = float(labelled_logits_loss(model, batch, num_items_in_batch=1))
        if labelled_only is None:
            full_sum = _full_logits_loss_sum(model, batch)
            labelled_only = abs(loss_sum - full_sum) <= 1e-4 * max(1.0, abs(full_sum))
            if not labelled_only:
                warnings.warn(f"answer_perplexity: labelled-position loss {loss_sum:.4f} differs from the model's "
                              f"{full_sum:.4f} on this architecture; using the model's full logits")
        if not labelled_only:
            loss_sum = _full_logits_loss_sum(model, batch)
        total_loss += loss_sum
        total_tokens += scored
    return float(torch.exp(torch.tensor(total_loss / max(total_tokens, 1))))


def padding_tokenizer(tokenizer):
    """``tokenizer``, or a copy whose pad is its EOS when it has no pad (Llama-3 and polyglot-ko bases have none).

    Batches are masked by position (attention mask 0 and label -100 on padding), so which id fills the padding does
    not matter; the tokenizer a user passed in is left as it was.
    """
    if tokenizer.pad_token_id is not None:
        return tokenizer
    padded = copy.deepcopy(tokenizer)
    padded.pad_token = padded.eos_token
    return padded


def _full_logits_loss_sum(model, batch) -> float:
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    labels = batch["labels"][:, 1:]
    scored = labels != -100
    return float(torch.nn.functional.cross_entropy(logits[:, :-1][scored].float(), labels[scored], reduction="sum"))


def distinct_n(tokens: list[str], n: int) -> float:
    grams = [tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1)]
    return len(set(grams)) / len(grams) if grams else 0.0


def repeated_ngram_share(tokens: list[str], n: int = 3) -> float:
    """Share of n-grams that already appeared earlier in the same text (loops score high)."""
    grams = [tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1)]
    return 1 - len(set(grams)) / len(grams) if grams else 0.0


_KIWI = None


def morphemes(text: str) -> list[str]:
    """Korean morphemes (kiwipiepy), so that overlap is not fooled by particles glued to words."""
    global _KIWI
    if _KIWI is None:
        from kiwipiepy import Kiwi
        _KIWI = Kiwi()
    return [token.form for token in _KIWI.tokenize(text)]


def morpheme_f1(answer: str, reference: str) -> float:
    """Unigram F1 between the morphemes of an answer and of the reference answer."""
    from collections import Counter

    got, want = Counter(morphemes(answer)), Counter(morphemes(reference))
    common = sum((got & want).values())
    if not common:
        return 0.0
    precision, recall = common / sum(got.values()), common / sum(want.values())
    return 2 * precision * recall / (precision + recall)


def _left_pad_id(tokenizer, prompt_ids: list[list[int]]) -> int | None:
    """A token to left-pad prompts with that cannot bias the comparison, or None to generate one at a time.

    The repetition penalty lowers every token present in a row, padding included (attention masks do not hide it
    from the penalty). The blog recipe's pad is its EOS, so padding with it would make that model less likely to
    stop. The first prompt token (BOS) is already in every row, so padding with it changes nothing; else a real
    pad token, which no answer needs.
    """
    firsts = {ids[0] for ids in prompt_ids if ids}
    if len(firsts) == 1 and all(prompt_ids):
        return firsts.pop()
    if tokenizer.pad_token_id is not None and tokenizer.pad_token_id != tokenizer.eos_token_id:
        return tokenizer.pad_token_id
    return None


@torch.no_grad()
def generate_answers(model, tokenizer, rows, max_new_tokens: int = 128, template: str = "koalpaca",
                     batch_size: int = 20, seed: int = 42, **sampling) -> tuple[list[dict], float]:
    """Answer many questions in left-padded batches (on a CPU, 20 at once give ~4x the tokens/s of one at a time).

    Returns (one dict per row with answer, new_tokens, ended_with_eos; wall seconds). An answer ends at its first
    EOS; a batch runs until every row has ended or reached max_new_tokens.
    """
    from helpers.data import format_prompt

    prompts = [tokenizer(format_prompt(r["instruction"], r.get("context", ""), tokenizer, template))["input_ids"]
               for r in rows]
    pad_id = _left_pad_id(tokenizer, prompts)
    batch_size = batch_size if pad_id is not None else 1
    device = next(model.parameters()).device
    kwargs = generation_kwargs(tokenizer, max_new_tokens=max_new_tokens, **sampling)
    starts = range(0, len(prompts), batch_size)
    # One tick per generated token of a batch: a batch of 20 answers is one long generate() call.
    bar = tqdm(total=len(starts) * max_new_tokens, desc=f"generating {len(prompts)} answers", unit="token",
               leave=False)
    progress = StoppingCriteriaList([TokenProgress(bar)])
    results, started = [], time.perf_counter()
    for batch_number, start in enumerate(starts):
        chunk = prompts[start:start + batch_size]
        width = max(len(ids) for ids in chunk)
        input_ids = torch.tensor([[pad_id] * (width - len(ids)) + ids for ids in chunk], device=device)
        attention_mask = torch.tensor([[0] * (width - len(ids)) + [1] * len(ids) for ids in chunk], device=device)
        torch.manual_seed(seed)
        output = model.generate(input_ids=input_ids, attention_mask=attention_mask, stopping_criteria=progress,
                                **kwargs)
        bar.update((batch_number + 1) * max_new_tokens - bar.n)  # a batch that stopped early
        for new_ids in output[:, width:].tolist():
            ended = tokenizer.eos_token_id in new_ids
            new_ids = new_ids[:new_ids.index(tokenizer.eos_token_id) + 1] if ended else new_ids
            results.append({"answer": tokenizer.decode(new_ids, skip_special_tokens=True).strip(),
                            "new_tokens": len(new_ids), "ended_with_eos": ended})
    bar.close()
    for row, result in zip(rows, results):
        result["question"] = row["instruction"]
    return results, time.perf_counter() - started


def evaluate_generations(model, tokenizer, rows, label: str, max_new_tokens: int = 128, template: str = "koalpaca",
                         seed: int = 42, batch_size: int = 20, speed_rows: int = 3, speed_tokens: int = 64,
                         **sampling) -> tuple[dict, list[dict]]:
    """Generate for every row and measure: EOS share, length, repetition, morpheme F1, speed.

    Answers come from :func:`generate_answers` (batched). Speed as a user chatting sees it is measured apart, on
    the first ``speed_rows`` questions one at a time, streamed, up to ``speed_tokens`` new tokens: median time to
    first token and mean tokens/s; the batched throughput is reported beside it. Returns (metrics, per-answer rows).
    Greedy decoding by default so that runs compare like with like.
    """
    sampling = {"do_sample": False, "repetition_penalty": 1.0, **sampling}
    generated, seconds = generate_answers(model, tokenizer, rows, max_new_tokens, template, batch_size, seed,
                                          **sampling)
    answers = []
    for row, result in zip(rows, generated):
        tokens = morphemes(result["answer"])
        answers.append({**result, "model": label, "reference": row["output"],
                        "morpheme_f1": morpheme_f1(result["answer"], row["output"]),
                        "distinct_2": distinct_n(tokens, 2), "repeated_3gram_share": repeated_ngram_share(tokens, 3)})
    speed = ask_many(model, tokenizer, rows[:speed_rows], desc="timing one at a time", template=template, seed=seed,
                     max_new_tokens=speed_tokens, **sampling)
    n = max(len(answers), 1)
    metrics = {
        "model": label, "answers": len(answers),
        "share_ended_with_eos": sum(a["ended_with_eos"] for a in answers) / n,
        "mean_answer_tokens": sum(a["new_tokens"] for a in answers) / n,
        "distinct_2": sum(a["distinct_2"] for a in answers) / n,
        "repeated_3gram_share": sum(a["repeated_3gram_share"] for a in answers) / n,
        "morpheme_f1": sum(a["morpheme_f1"] for a in answers) / n,
        "median_time_to_first_token_s": sorted(s["time_to_first_token_s"] for s in speed)[len(speed) // 2]
        if speed else None,
        "mean_tokens_per_s": sum(s["tokens_per_s"] for s in speed) / len(speed) if speed else None,
        "batched_tokens_per_s": sum(a["new_tokens"] for a in answers) / seconds if seconds else None,
    }
    return metrics, answers
