"""The call path's tokenizing shortcut gives exactly the ids of the ``transformers`` calls
it stands in for."""

import pytest

from airi_ray.runtime.calls import _count_tokens, token_ids

TEXTS = [
    "",
    "How do returns work at Nimbus Gear?",
    "  leading spaces, trailing\n\n\ttabs  ",
    "naïve café — 東京 🚀 <|im_start|> </s> <s>",
    "tents boots refunds shipping warranty " * 400,
]


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    from airi_ray.models.tiny import ensure_tiny_model

    tok = AutoTokenizer.from_pretrained(str(ensure_tiny_model()))
    tok("warm-up")  # as the call path loads it
    return tok


@pytest.mark.parametrize("special", [True, False])
@pytest.mark.parametrize("text", TEXTS)
def test_ids_and_counts_are_the_tokenizers_own(tokenizer, text: str, special: bool) -> None:
    want = tokenizer(text, add_special_tokens=special)["input_ids"]
    assert token_ids(tokenizer, text, add_special_tokens=special) == want
    assert _count_tokens(tokenizer, text) == len(
        tokenizer(text, add_special_tokens=False)["input_ids"]
    )


@pytest.mark.parametrize("text", TEXTS[1:])
def test_a_rendered_chat_tokenizes_as_apply_chat_template_does(tokenizer, text: str) -> None:
    turns = [
        {"role": "system", "content": "You are Nimbus Gear's support assistant."},
        {"role": "user", "content": text},
        {"role": "assistant", "content": "Happy to help."},
        {"role": "user", "content": text[::-1]},
    ]
    want = tokenizer.apply_chat_template(turns, add_generation_prompt=True, tokenize=True)
    if not isinstance(want, list):
        want = want["input_ids"]
    rendered = tokenizer.apply_chat_template(turns, add_generation_prompt=True, tokenize=False)
    assert token_ids(tokenizer, rendered, add_special_tokens=False) == list(want)
