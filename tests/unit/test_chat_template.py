"""The chat template renders the training prompt: single questions as format_prompt does (with and without
context), conversations as the training text of conversation_segments, and a pipeline fed messages gives the
model the token ids training gave it."""
import jinja2
import pytest
import torch
from jinja2.sandbox import ImmutableSandboxedEnvironment
from transformers import AutoModelForCausalLM, AutoTokenizer, pipeline

from helpers.chat_template import attach_chat_template, chat_template
from helpers.data import encode_example, load_instructions
from helpers.data.prompts import conversation_segments, format_prompt

QUESTION = "김치찌개를 맛있게 끓이는 방법은?"
CONTEXT = "메모: 묵은지 한 포기, 돼지고기 300g."
CONVERSATION = [
    {"role": "system", "content": "당신은 요리 선생님입니다."},
    {"role": "user", "content": "된장찌개에 뭘 넣나요?"},
    {"role": "assistant", "content": "두부, 애호박, 양파를 넣어요."},
    {"role": "user", "content": "멸치 육수는 몇 분 끓여요?"},
    {"role": "assistant", "content": "10분 정도 끓이고 건져요."},
]


class _NamedTokens:
    """The two attributes format_prompt and conversation_segments read, for rendering without a real tokenizer."""
    bos_token, eos_token = "<bos>", "<eos>"


def _render(messages, add_generation_prompt, template="koalpaca"):
    # A plain Jinja environment without transformers' trim options: the template must not depend on them.
    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    compiled = ImmutableSandboxedEnvironment().from_string(chat_template(template))
    return compiled.render(messages=messages, add_generation_prompt=add_generation_prompt, bos_token="<bos>",
                           eos_token="<eos>", raise_exception=raise_exception)


@pytest.mark.parametrize("template", ["koalpaca", "special_tokens"])
@pytest.mark.parametrize("context", ["", CONTEXT])
def test_one_question_renders_as_format_prompt(template, context):
    messages = ([{"role": "system", "content": context}] if context else []) + [{"role": "user", "content": QUESTION}]
    assert _render(messages, True, template) == "<bos>" + format_prompt(QUESTION, context, template=template)


def test_a_conversation_renders_as_its_training_text():
    segments = conversation_segments(CONVERSATION, _NamedTokens(), "koalpaca")
    training_text = "".join(piece for piece, _ in segments)
    assert _render(CONVERSATION, False) == "<bos>" + training_text + "<eos>"
    prompt = _render(CONVERSATION[:-1], True)
    assert prompt == "<bos>" + training_text[: -len(" " + CONVERSATION[-1]["content"])]
    assert prompt.endswith("<eos>\n\n### 질문: 멸치 육수는 몇 분 끓여요?\n\n### 답변:")
    assert prompt.count("### 맥락:") == 1


def test_an_empty_system_message_adds_no_context():
    messages = [{"role": "system", "content": ""}, {"role": "user", "content": QUESTION}]
    assert _render(messages, True) == "<bos>" + format_prompt(QUESTION)


@pytest.mark.parametrize("messages", [
    [{"role": "assistant", "content": "먼저 답합니다."}],
    [{"role": "user", "content": "하나"}, {"role": "user", "content": "둘"}],
    [{"role": "user", "content": [{"type": "text", "text": "목록 형식"}]}],
])
def test_messages_out_of_order_are_refused(messages):
    with pytest.raises(jinja2.exceptions.TemplateError):
        _render(messages, True)


def test_the_tokenizers_own_template_is_refused():
    with pytest.raises(ValueError, match="tokenizer's own chat template"):
        chat_template("chat")


# ------------------------------------------------------------------------- the real tokenizer (slow)

def _shipped_rows(with_context: bool, n: int = 3) -> list:
    rows = load_instructions("shipped", verbose=False)[0]["train"]
    return [row for row in rows if bool(row["context"]) == with_context][:n]


@pytest.mark.parametrize("with_context", [False, True])
def test_apply_chat_template_gives_the_training_prompt_and_its_ids(tokenizer, with_context):
    attach_chat_template(tokenizer)
    for row in _shipped_rows(with_context):
        messages = ([{"role": "system", "content": row["context"]}] if row["context"] else []) + \
            [{"role": "user", "content": row["instruction"]}]
        prompt = format_prompt(row["instruction"], row["context"])
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        assert text == tokenizer.bos_token + prompt
        ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_dict=True)["input_ids"]
        training_prompt_ids = encode_example(row, tokenizer, "answer_only")["labels"].count(-100)
        assert ids == tokenizer(prompt)["input_ids"]
        assert len(ids) == training_prompt_ids


def test_a_conversation_tokenizes_as_training_does(tokenizer):
    attach_chat_template(tokenizer)
    text = tokenizer.apply_chat_template(CONVERSATION, tokenize=False)
    training_text = "".join(piece for piece, _ in conversation_segments(CONVERSATION, tokenizer))
    assert text == tokenizer.bos_token + training_text + tokenizer.eos_token
    ids = tokenizer.apply_chat_template(CONVERSATION, return_dict=True)["input_ids"]
    assert ids == encode_example({"messages": CONVERSATION}, tokenizer, "answer_only")["input_ids"]


def test_training_with_the_chat_template_trains_the_same_answers(tokenizer):
    attach_chat_template(tokenizer)
    as_koalpaca = conversation_segments(CONVERSATION, tokenizer, "koalpaca")
    as_chat = conversation_segments(CONVERSATION, tokenizer, "chat")
    trained = lambda segments: [piece for piece, is_trained in segments if is_trained]  # noqa: E731
    assert "".join(trained(as_chat)) == "".join(trained(as_koalpaca)) + tokenizer.eos_token


def test_a_saved_tokenizer_carries_the_template(tokenizer, tmp_path):
    attach_chat_template(tokenizer).save_pretrained(tmp_path)
    assert (tmp_path / "chat_template.jinja").read_text(encoding="utf-8") == chat_template()
    assert AutoTokenizer.from_pretrained(tmp_path).chat_template == chat_template()


def test_a_pipeline_fed_messages_gives_the_model_the_training_prompt(tiny_model_dir):
    tokenizer = attach_chat_template(AutoTokenizer.from_pretrained(tiny_model_dir))
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    seen = []
    model.register_forward_pre_hook(lambda module, args, kwargs: seen.append(kwargs["input_ids"][0].tolist()),
                                    with_kwargs=True)
    generate = pipeline("text-generation", model=model, tokenizer=tokenizer, device="cpu")
    messages = [{"role": "system", "content": CONTEXT}, {"role": "user", "content": QUESTION}]
    with torch.no_grad():
        reply = generate(messages, max_new_tokens=2, do_sample=False)
    assert seen[0] == tokenizer(format_prompt(QUESTION, CONTEXT))["input_ids"]
    assert reply[0]["generated_text"][-1]["role"] == "assistant"
