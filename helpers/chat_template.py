"""A Jinja chat template that renders our training prompt, so a saved model answers chat requests in the form it
was trained on (``tokenizer.apply_chat_template``, transformers pipelines, llama.cpp and LM Studio, which read the
template from tokenizer_config / chat_template.jinja or from the GGUF metadata).

What it renders, for the template ``koalpaca`` (the strings come from ``prompt_templates.json``, the one source of
truth that :func:`helpers.data.format_prompt` also reads):

- ``[user q]`` with ``add_generation_prompt=True``: ``<bos>### 질문: q\\n\\n### 답변:``, which is the BOS text
  followed by ``format_prompt(q)``;
- a first ``system`` message is the context: ``<bos>### 맥락: s\\n\\n### 질문: q\\n\\n### 답변:`` equals the BOS
  text followed by ``format_prompt(q, s)``. We chose the system message (not a field of the user turn) because
  that is how :func:`helpers.data.conversation_segments` trains messages rows: the system turn becomes the first
  question's context and later questions have none;
- several exchanges render as the training text of that conversation: every answer is followed by the EOS text,
  and a blank line separates it from the next question; the generation prompt ends at ``### 답변:``, where the
  model's answer (trained as `` answer``) begins.

Why the template starts with the BOS text: ``apply_chat_template`` and the pipelines tokenize its output without
adding special tokens (the template is expected to carry them), while training tokenizes ``format_prompt`` with
them, so the model learned every prompt after a BOS. The rendered text is therefore ``bos_token + format_prompt``
and its token ids are exactly those training and :func:`helpers.evaluation.ask` use.

The assistant header (``\\n\\n### 답변:``) belongs to the assistant turn, not the user turn, so the template works
with the ``chat`` prompt template of training too: a prompt rendered with ``add_generation_prompt=True`` is a
prefix of the conversation rendered with its answer, and what is added is the answer and its EOS.
"""
from __future__ import annotations

import json
import string

from helpers.data.prompts import TURN_SEPARATOR, prompt_templates

DEFAULT_TEMPLATE = "koalpaca"


def _jinja_literal(text: str) -> str:
    # A JSON string is a valid Jinja string literal: Jinja decodes the same backslash escapes (\n, \", \\).
    return json.dumps(text, ensure_ascii=False)


def _jinja_expression(pattern: str, fields: dict[str, str]) -> str:
    """A ``str.format`` pattern of prompt_templates.json as one Jinja expression, each ``{field}`` replaced by the
    Jinja expression in ``fields``."""
    parts = []
    for literal, field, spec, conversion in string.Formatter().parse(pattern):
        if literal:
            parts.append(_jinja_literal(literal))
        if field is not None:
            if spec or conversion or field not in fields:
                raise ValueError(f"the prompt pattern {pattern!r} has a field {{{field}}} that a chat template "
                                 f"cannot render; it may use {', '.join('{' + f + '}' for f in fields)}")
            parts.append(fields[field])
    return " ~ ".join(parts) if parts else '""'


def split_answer_header(pattern: str, field: str = "instruction") -> tuple[str, str]:
    """``(question part, answer header)`` of a prompt pattern of prompt_templates.json: the header is the text
    after its last field (``\n\n### 답변:`` for koalpaca), which the assistant turn renders."""
    marker = "{" + field + "}"
    if not pattern.endswith(marker) and marker in pattern:
        cut = pattern.rindex(marker) + len(marker)
        return pattern[:cut], pattern[cut:]
    raise ValueError(f"the prompt pattern {pattern!r} does not end with an answer header after {marker}")


def chat_template(template: str = DEFAULT_TEMPLATE) -> str:
    """The Jinja chat template that renders ``template`` (a name in prompt_templates.json) as training does."""
    templates = prompt_templates()
    if template not in templates:
        raise ValueError(f"unknown template {template!r}; choose one of {', '.join(templates)}")
    spec = templates[template]
    if spec.get("use_chat_template"):
        raise ValueError(f"template {template!r} is the tokenizer's own chat template; there is nothing to build")
    question, header = split_answer_header(spec["prompt"])
    question_with_context, header_with_context = split_answer_header(spec["prompt_with_context"])
    if header != header_with_context:
        raise ValueError(f"template {template!r} ends its prompt differently with and without context "
                         f"({header!r}, {header_with_context!r}); a chat template needs one answer header")
    content = "message['content']"
    question = _jinja_expression(question, {"instruction": content})
    question_with_context = _jinja_expression(question_with_context, {"instruction": content, "context": "context"})
    answer = _jinja_expression(spec.get("answer", "{output}"), {"output": content})
    header, separator = _jinja_literal(header), _jinja_literal(TURN_SEPARATOR)
    # Whitespace control ({%- -%}) keeps the template's own layout out of the rendered text.
    return f"""{{#- Korean QLoRA lab: the '{template}' training prompt as a chat template. -#}}
{{%- if messages and messages[0]['role'] == 'system' -%}}
    {{%- set context = messages[0]['content'] -%}}
    {{%- set turns = messages[1:] -%}}
{{%- else -%}}
    {{%- set context = '' -%}}
    {{%- set turns = messages -%}}
{{%- endif -%}}
{{{{- bos_token -}}}}
{{%- for message in turns -%}}
    {{%- if message['content'] is not string -%}}
        {{{{- raise_exception('each message content must be a string') -}}}}
    {{%- endif -%}}
    {{%- if message['role'] != ('user' if loop.index0 % 2 == 0 else 'assistant') -%}}
        {{{{- raise_exception('after an optional system message, roles must go user, assistant, user, ...') -}}}}
    {{%- endif -%}}
    {{%- if message['role'] == 'user' -%}}
        {{%- if not loop.first -%}}{{{{- {separator} -}}}}{{%- endif -%}}
        {{%- if loop.first and context -%}}
            {{{{- {question_with_context} -}}}}
        {{%- else -%}}
            {{{{- {question} -}}}}
        {{%- endif -%}}
    {{%- else -%}}
        {{{{- {header} ~ {answer} ~ eos_token -}}}}
    {{%- endif -%}}
{{%- endfor -%}}
{{%- if add_generation_prompt -%}}{{{{- {header} -}}}}{{%- endif -%}}
"""


def attach_chat_template(tokenizer, template: str = DEFAULT_TEMPLATE):
    """Set the chat template that renders ``template`` on ``tokenizer`` and return it; ``save_pretrained`` then
    writes it (chat_template.jinja), and llama.cpp's converter copies it into the GGUF metadata.

    A model trained with the ``chat`` template already has its tokenizer's own template, which is left as it is.
    """
    if prompt_templates().get(template, {}).get("use_chat_template"):
        return tokenizer
    if not getattr(tokenizer, "eos_token", None):
        raise ValueError("this tokenizer has no eos_token; the chat template ends every answer with it")
    tokenizer.chat_template = chat_template(template)
    return tokenizer
