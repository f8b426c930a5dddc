"""Generation and evaluation: the KoAlpaca ``ask()`` flow with timing, and answer metrics."""
from __future__ import annotations

import time

import torch
from transformers import TextStreamer


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
