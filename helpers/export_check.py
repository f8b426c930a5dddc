"""Check exported GGUF files with a real consumer, llama.cpp (through ``llama_cpp.Llama``), against the merged
model they came from (transformers, fp32 on CPU), on the same prompt token ids:

- greedy answers: the first ``max_new_tokens`` tokens (or up to the EOS) of each question; the share of
  questions answered with identical tokens (target: at least 95% for f16);
- perplexity of the eval answers (the answer tokens and their EOS given the prompt, as training labels them);
  the relative difference (targets: within 1% for f16, 3% for q8_0);
- tokenization: whether llama.cpp turns each prompt text into the same ids, which is what a llama.cpp or Ollama
  user feeds it;
- the round trip through transformers' own GGUF loader (``from_pretrained(folder, gguf_file=...)``).
"""
from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path

import numpy as np
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

from helpers.data import encode_example, load_instructions
from helpers.data.prompts import format_prompt
from helpers.outputs import atomic_write_text

TARGETS = {"identical_share": {"f16": 0.95}, "perplexity_relative_difference": {"f16": 0.01, "q8_0": 0.03}}
DEFAULT_NEW_TOKENS = 32


def _prompt_ids(tokenizer, row) -> list[int]:
    # As helpers.evaluation.ask tokenizes a question: the tokenizer's BOS, then the training prompt.
    return tokenizer(format_prompt(row["instruction"], row.get("context", "")))["input_ids"]


def _answer_labels(tokenizer, row) -> tuple[list[int], list[int]]:
    example = encode_example(row, tokenizer, "answer_only")
    return example["input_ids"], example["labels"]


def _token_nll(logits: np.ndarray, ids: list[int], labels: list[int]) -> np.ndarray:
    """The negative log-likelihood of each labelled token (label != -100), predicted from the position before it,
    in float64 so that the two consumers' values compare to many digits."""
    positions = [i for i in range(1, len(ids)) if labels[i] != -100]
    rows = logits[[i - 1 for i in positions]].astype(np.float64)
    log_norm = np.log(np.exp(rows - rows.max(axis=1, keepdims=True)).sum(axis=1)) + rows.max(axis=1)
    return log_norm - rows[range(len(positions)), [ids[i] for i in positions]]


def _greedy_answers(model, tokenizer, rows, max_new_tokens: int) -> list[list[int]]:
    greedy = GenerationConfig(do_sample=False, max_new_tokens=max_new_tokens, eos_token_id=tokenizer.eos_token_id,
                              pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id)
    answers = []
    with torch.no_grad():
        for row in rows:
            prompt = torch.tensor([_prompt_ids(tokenizer, row)])
            answers.append(model.generate(prompt, attention_mask=torch.ones_like(prompt),
                                          generation_config=greedy)[0, prompt.shape[1]:].tolist())
    return answers


def transformers_reference(merged_dir: str | Path, rows, max_new_tokens: int = DEFAULT_NEW_TOKENS) -> dict:
    """The merged model's greedy tokens and answer perplexity in fp32 on CPU: what every GGUF is compared with."""
    rows = list(rows)
    tokenizer = AutoTokenizer.from_pretrained(merged_dir)
    model = AutoModelForCausalLM.from_pretrained(merged_dir, dtype=torch.float32).eval()
    started = time.perf_counter()
    answers = _greedy_answers(model, tokenizer, rows, max_new_tokens)
    token_nll = []
    with torch.no_grad():
        for row in rows:
            ids, labels = _answer_labels(tokenizer, row)
            token_nll.append(_token_nll(model(torch.tensor([ids])).logits[0].float().numpy(), ids, labels))
    token_nll = np.concatenate(token_nll)
    return {"answers": answers, "token_nll": token_nll, "perplexity": math.exp(token_nll.mean()),
            "seconds": time.perf_counter() - started, "tokenizer": tokenizer}


def _llama(gguf_path: Path, n_ctx: int):
    try:
        from llama_cpp import Llama  # optional dependency: only the export check needs it
    except ImportError as error:
        raise ImportError("checking a GGUF needs llama.cpp's Python package: pip install "
                          "llama-cpp-python==0.3.36") from error
    # logits_all keeps every position's logits (for the perplexity); n_ctx bounds that array (n_ctx x vocab).
    return Llama(model_path=str(gguf_path), n_ctx=n_ctx, n_batch=n_ctx, logits_all=True, verbose=False,
                 n_threads=os.cpu_count() or 1)


def _llama_greedy(llm, prompt: list[int], max_new_tokens: int, eos_id: int) -> list[int]:
    llm.reset()
    llm.eval(prompt)
    answer = []
    while len(answer) < max_new_tokens:
        token = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        answer.append(token)
        if token == eos_id:
            break
        llm.eval([token])
    return answer


def check_gguf(gguf_path: str | Path, merged_dir: str | Path, rows, max_new_tokens: int = DEFAULT_NEW_TOKENS,
               reference: dict | None = None) -> dict:
    """Compare one GGUF file, run by llama.cpp, with the merged model on ``rows`` (instruction rows).

    ``reference``: :func:`transformers_reference` of the same rows, computed once for several files."""
    rows = list(rows)
    reference = reference or transformers_reference(merged_dir, rows, max_new_tokens)
    tokenizer = reference["tokenizer"]
    examples = [_answer_labels(tokenizer, row) for row in rows]
    prompts = [_prompt_ids(tokenizer, row) for row in rows]
    longest = max(max(len(ids) for ids, _ in examples), max(len(p) for p in prompts) + max_new_tokens)
    llm = _llama(Path(gguf_path), n_ctx=64 * math.ceil(longest / 64))
    started = time.perf_counter()
    answers = [_llama_greedy(llm, prompt, max_new_tokens, tokenizer.eos_token_id) for prompt in prompts]
    token_nll = []
    for ids, labels in examples:
        llm.reset()
        llm.eval(ids)
        token_nll.append(_token_nll(np.asarray(llm.scores[: len(ids)]), ids, labels))
    token_nll = np.concatenate(token_nll)
    same_tokenization = [llm.tokenize(format_prompt(r["instruction"], r.get("context", "")).encode("utf-8"),
                                      add_bos=True, special=True) == p for r, p in zip(rows, prompts)]
    llm.close()
    perplexity = math.exp(token_nll.mean())
    matching_prefix = [_common_prefix(a, b) / max(len(b), 1) for a, b in zip(answers, reference["answers"])]
    return {
        "file": Path(gguf_path).name,
        "megabytes": Path(gguf_path).stat().st_size / 2**20,
        "questions": len(rows),
        "identical_share": sum(a == b for a, b in zip(answers, reference["answers"])) / len(rows),
        "mean_matching_prefix": float(np.mean(matching_prefix)),
        "perplexity": perplexity,
        "reference_perplexity": reference["perplexity"],
        "perplexity_relative_difference": perplexity / reference["perplexity"] - 1,
        "max_token_nll_difference": float(np.abs(token_nll - reference["token_nll"]).max()),
        "same_prompt_tokenization_share": sum(same_tokenization) / len(rows),
        "seconds": time.perf_counter() - started,
        "answers": answers,
    }


def _common_prefix(a: list, b: list) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def round_trip(gguf_path: str | Path, rows, reference: dict, max_new_tokens: int = DEFAULT_NEW_TOKENS) -> dict:
    """Load the GGUF back with transformers' GGUF loader and compare its greedy answers with the merged model's
    (``reference``, from :func:`transformers_reference` on the same rows), and its tokenizer's prompt ids. What
    transformers cannot read (an architecture, a file type, a tokenizer) is reported, not raised."""
    gguf_path, rows = Path(gguf_path), list(rows)
    tokenizer = reference["tokenizer"]
    result = {"file": gguf_path.name, "questions": len(rows)}
    try:
        model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name,
                                                     dtype=torch.float32).eval()
    except Exception as error:  # noqa: BLE001  (any failure of the loader is the finding)
        return {**result, "loaded": False, "error": f"transformers cannot load {gguf_path.name} as a model: "
                                                    f"{type(error).__name__}: {error}"[:400]}
    answers = _greedy_answers(model, tokenizer, rows, max_new_tokens)
    result.update(loaded=True, identical_share=sum(a == b for a, b in zip(answers, reference["answers"])) / len(rows))
    try:
        from_gguf = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
        result["same_prompt_tokenization_share"] = sum(
            from_gguf(format_prompt(r["instruction"], r.get("context", "")))["input_ids"] == _prompt_ids(tokenizer, r)
            for r in rows) / len(rows)
    except Exception as error:  # noqa: BLE001
        result["tokenizer_error"] = f"transformers cannot read the GGUF's tokenizer: {type(error).__name__}: " \
                                    f"{error}"[:400]
    return result


def meets_targets(result: dict, gguf_type: str) -> bool:
    return all(abs(result[measure]) <= limit if measure.endswith("difference") else result[measure] >= limit
               for measure, limits in TARGETS.items() for t, limit in limits.items() if t == gguf_type)


def check_table(results: dict[str, dict]) -> str:
    """One line per GGUF type: size, identical greedy answers, perplexity and its difference, tokenization."""
    lines = [f"{'type':<8} {'size':>10} {'identical':>10} {'prefix':>7} {'perplexity':>11} {'vs merged':>10} "
             f"{'same ids':>9} {'targets':>8}"]
    for gguf_type, r in results.items():
        lines.append(f"{gguf_type:<8} {r['megabytes']:>7.1f} MB {r['identical_share']:>10.1%} "
                     f"{r['mean_matching_prefix']:>7.1%} {r['perplexity']:>11.3f} "
                     f"{r['perplexity_relative_difference']:>+10.2%} {r['same_prompt_tokenization_share']:>9.1%} "
                     f"{'met' if meets_targets(r, gguf_type) else 'MISSED':>8}")
    if results:
        first = next(iter(results.values()))
        lines.append(f"merged model (transformers, fp32): perplexity {first['reference_perplexity']:.3f} on "
                     f"{first['questions']} eval answers; identical = the first greedy tokens equal")
    return "\n".join(lines)


def check_files(files: dict[str, Path], merged_dir: str | Path, data: str = "shipped", n_questions: int = 32,
                record: str | Path | None = None, max_new_tokens: int = DEFAULT_NEW_TOKENS,
                round_trip_types=("f16",)) -> dict:
    """Check every exported file on the first ``n_questions`` eval rows of ``data``, print the table and the round
    trips (f16 only by default: transformers dequantizes every type the same way, and each load costs minutes on a
    CPU), and write the numbers (without the answers) to ``record``."""
    rows = list(load_instructions(data, verbose=False)[0]["eval"].select(range(n_questions)))
    print(f"checking with llama.cpp on {len(rows)} eval questions (first {max_new_tokens} greedy tokens)")
    reference = transformers_reference(merged_dir, rows, max_new_tokens)
    print(f"  merged model in transformers (fp32): {reference['seconds']:.0f} s", flush=True)
    results, trips = {}, {}
    for gguf_type, path in files.items():
        result = results[gguf_type] = check_gguf(path, merged_dir, rows, max_new_tokens, reference)
        print(f"  {path.name}: llama.cpp {result['seconds']:.0f} s, identical {result['identical_share']:.1%}, "
              f"perplexity {result['perplexity_relative_difference']:+.2%} vs merged", flush=True)
        if gguf_type in round_trip_types:
            trips[gguf_type] = round_trip(path, rows, reference, max_new_tokens)
    print(check_table(results))
    for gguf_type, trip in trips.items():
        print(f"transformers' GGUF loader, {gguf_type}: " + (trip["error"] if not trip["loaded"] else
              f"identical greedy answers {trip['identical_share']:.1%}; " + (
                  f"its tokenizer gives the same prompt ids {trip['same_prompt_tokenization_share']:.1%}"
                  if "tokenizer_error" not in trip else trip["tokenizer_error"])))
    summary = {"questions": len(rows), "max_new_tokens": max_new_tokens, "targets": TARGETS,
               "llama_cpp": {t: {k: v for k, v in r.items() if k != "answers"} for t, r in results.items()},
               "transformers_gguf_loader": trips, "reference_perplexity": reference["perplexity"]}
    if record:
        atomic_write_text(record, json.dumps(summary, ensure_ascii=False, indent=1) + "\n")
    return summary
