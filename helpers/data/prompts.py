"""Prompt templates: the prompt and answer text of a row, a conversation as trained and untrained pieces, and the
whole training text of a row of any shape."""
from __future__ import annotations

import json

from helpers.data.sources import RESOURCES
from helpers.data.validation import row_shape

TURN_SEPARATOR = "\n\n"  # between one answer's EOS and the next question in a multi-turn template rendering


def prompt_templates() -> dict:
    return json.loads((RESOURCES / "prompt_templates.json").read_text(encoding="utf-8"))


def _uses_chat_template(template: str) -> bool:
    return bool(prompt_templates()[template].get("use_chat_template"))


def _check_template(tokenizer, template: str):
    if template not in prompt_templates():
        raise ValueError(f"unknown template {template!r}; choose one of {', '.join(prompt_templates())}")
    if _uses_chat_template(template) and (tokenizer is None or not getattr(tokenizer, "chat_template", None)):
        raise ValueError(f"template {template!r} needs a tokenizer that has a chat template (this one has none); "
                         f"use 'koalpaca'")


def format_prompt(instruction: str, context: str = "", tokenizer=None, template: str = "koalpaca") -> str:
    """The prompt text up to where the answer starts."""
    spec = prompt_templates()[template]
    if spec.get("use_chat_template"):
        _check_template(tokenizer, template)
        content = f"{context}\n\n{instruction}" if context else instruction
        return tokenizer.apply_chat_template([{"role": "user", "content": content}], tokenize=False,
                                             add_generation_prompt=True)
    pattern = spec["prompt_with_context"] if context else spec["prompt"]
    return pattern.format(instruction=instruction, context=context)


def format_answer(output: str, template: str = "koalpaca") -> str:
    spec = prompt_templates()[template]
    return spec.get("answer", "{output}").format(output=output)


def _dialogue(messages) -> tuple[str, list[tuple[str, str]]]:
    """``(system, [(user, assistant), ...])`` of validated turns."""
    system = messages[0]["content"] if messages[0]["role"] == "system" else ""
    turns = [turn["content"] for turn in messages if turn["role"] != "system"]
    return system, list(zip(turns[0::2], turns[1::2]))


def conversation_segments(messages, tokenizer, template: str = "koalpaca") -> list[tuple[str, bool]]:
    """A conversation as ``(text, trained)`` pieces, in order; joined they are the training text (without the
    final EOS, which :func:`encode_example` appends).

    Template forms (koalpaca, special_tokens): the system turn is the first question's context (``### 맥락:``),
    each exchange is a prompt then an answer, and every answer but the last is followed by the EOS text and a
    blank line before the next question. The chat form renders the tokenizer's own chat template and trains what
    each assistant turn adds to it: its content and the template's end-of-turn marker.
    """
    if _uses_chat_template(template):
        return _chat_segments(messages, tokenizer, template)
    system, exchanges = _dialogue(messages)
    segments = []
    for i, (question, answer) in enumerate(exchanges):
        prompt = format_prompt(question, system if i == 0 else "", tokenizer, template)
        segments += [(TURN_SEPARATOR + prompt if i else prompt, False), (format_answer(answer, template), True)]
        if i < len(exchanges) - 1:
            segments.append((tokenizer.eos_token, True))
    return segments


def _chat_segments(messages, tokenizer, template: str) -> list[tuple[str, bool]]:
    _check_template(tokenizer, template)
    render = lambda turns, **kw: tokenizer.apply_chat_template(list(turns), tokenize=False, **kw)  # noqa: E731
    text = render(messages)
    segments, done = [], 0
    for i, turn in enumerate(messages):
        if turn["role"] != "assistant":
            continue
        start, end = len(render(messages[:i], add_generation_prompt=True)), len(render(messages[:i + 1]))
        if not (done <= start <= end <= len(text)):
            raise ValueError("the tokenizer's chat template does not render a conversation as the prefixes of its "
                             "turns, so assistant turns cannot be found in it; use template 'koalpaca'")
        segments += [(text[done:start], False), (text[start:end], True)]
        done = end
    if done < len(text):
        segments.append((text[done:], False))
    return [(piece, trained) for piece, trained in segments if piece]


def full_text(row: dict, tokenizer, template: str = "koalpaca") -> str:
    """The whole training text of a row of any shape, without the final EOS (as the blog recipe feeds it)."""
    shape = row_shape(row)
    if shape == "text":
        return _text_body(row["text"], tokenizer)
    if shape == "messages":
        return "".join(piece for piece, _ in conversation_segments(row["messages"], tokenizer, template))
    return format_prompt(row["instruction"], row.get("context", ""), tokenizer, template) + \
        format_answer(row["output"], template)


def _text_body(text: str, tokenizer) -> str:
    # Transcripts made for SFTTrainer often end in the EOS text already (Unsloth's "+ EOS_TOKEN"); the one
    # trained EOS is appended as an id, so a second one is cut here.
    eos = getattr(tokenizer, "eos_token", None)
    return text[: -len(eos)].rstrip() if eos and text.endswith(eos) else text
