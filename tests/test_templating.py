"""Templating: the loss covers exactly the answers and the EOS (or end-of-turn token) ending each of them."""

from __future__ import annotations

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from apollo_ray.data.mixture import IGNORE_INDEX, render, render_item

EOS = "<|endoftext|>"
CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
CORPUS = [
    "User: What is hypertension?\nAssistant: Hypertension is persistently high blood pressure.",
    "What are the symptoms of diabetes? Thirst, frequent urination and fatigue are common symptoms.",
    "The patient should rest, drink fluids and see a doctor if the fever persists.",
    "高血压是指血压持续升高。 La hipertensión es la presión arterial alta.",
]


@pytest.fixture(scope="module")
def tokenizer() -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=[EOS, "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(CORPUS * 5, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS,
                                   additional_special_tokens=["<|im_start|>", "<|im_end|>"])


@pytest.fixture(scope="module")
def chat_tokenizer(tokenizer: PreTrainedTokenizerFast) -> PreTrainedTokenizerFast:
    tok = PreTrainedTokenizerFast(tokenizer_object=tokenizer.backend_tokenizer, eos_token=EOS,
                                  additional_special_tokens=["<|im_start|>", "<|im_end|>"])
    tok.chat_template = CHATML
    return tok


def _runs(ids: list[int], labels: list[int]) -> list[list[int]]:
    """Maximal runs of labelled tokens, checking each label is its own token (no shift)."""
    runs: list[list[int]] = []
    prev = False
    for t, (i, lab) in enumerate(zip(ids, labels)):
        on = lab != IGNORE_INDEX
        if on:
            assert lab == i, f"label at {t} is {lab}, token is {i}"
            if not prev:
                runs.append([])
            runs[-1].append(i)
        prev = on
    return runs


def _decode(tok: PreTrainedTokenizerFast, ids: list[int]) -> str:
    return tok.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)


QA = [{"role": "user", "content": "What is hypertension?"},
      {"role": "assistant", "content": "Hypertension is persistently high blood pressure."}]
MULTI = QA + [{"role": "user", "content": "Y en español?"},
              {"role": "assistant", "content": "La hipertensión es la presión arterial alta. 高血压"}]


def test_apollo_single_turn(tokenizer: PreTrainedTokenizerFast):
    ids, labels = render(QA, tokenizer)
    assert len(ids) == len(labels)
    assert _decode(tokenizer, ids) == f"User:{QA[0]['content']}\nAssistant:{QA[1]['content']}{EOS}"
    runs = _runs(ids, labels)
    assert [_decode(tokenizer, r) for r in runs] == [QA[1]["content"] + EOS]
    # the EOS is labelled on the EOS itself, the last token — not one off
    assert ids[-1] == labels[-1] == tokenizer.eos_token_id
    prompt = [i for i, lab in zip(ids, labels) if lab == IGNORE_INDEX]
    assert _decode(tokenizer, prompt) == f"User:{QA[0]['content']}\nAssistant:"


def test_apollo_multi_turn(tokenizer: PreTrainedTokenizerFast):
    ids, labels = render_item({"messages": MULTI}, tokenizer)
    text = (f"User:{MULTI[0]['content']}\nAssistant:{MULTI[1]['content']}{EOS}"
            f"\nUser:{MULTI[2]['content']}\nAssistant:{MULTI[3]['content']}{EOS}")
    assert _decode(tokenizer, ids) == text
    runs = _runs(ids, labels)
    assert [_decode(tokenizer, r) for r in runs] == [MULTI[1]["content"] + EOS, MULTI[3]["content"] + EOS]
    unlabelled = _decode(tokenizer, [i if lab == IGNORE_INDEX else tokenizer.eos_token_id
                                     for i, lab in zip(ids, labels)])
    assert MULTI[0]["content"] in unlabelled and MULTI[2]["content"] in unlabelled


def test_trailing_user_turn_and_no_answer(tokenizer: PreTrainedTokenizerFast):
    assert render(QA + [{"role": "user", "content": "And then?"}], tokenizer) == render(QA, tokenizer)
    with pytest.raises(ValueError, match="no assistant"):
        render(QA[:1], tokenizer)
    with pytest.raises(ValueError, match="role"):
        render([{"role": "tool", "content": "x"}], tokenizer)


@pytest.mark.parametrize("messages", [QA, MULTI, [{"role": "system", "content": "Be brief."}, *MULTI]])
def test_chat_template(chat_tokenizer: PreTrainedTokenizerFast, messages: list[dict]):
    ids, labels = render(messages, chat_tokenizer)
    assert ids == chat_tokenizer(chat_tokenizer.apply_chat_template(messages, tokenize=False),
                                 add_special_tokens=False)["input_ids"]
    answers = [m["content"] + "<|im_end|>" for m in messages if m["role"] == "assistant"]
    assert [_decode(chat_tokenizer, r) for r in _runs(ids, labels)] == answers
    # user turns' <|im_end|> is not a target; the newline after an answer's <|im_end|> is not either
    im_end = chat_tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert labels.count(im_end) == len(answers) < ids.count(im_end)
    assert all(labels[t + 1] == IGNORE_INDEX for t in range(len(ids) - 1) if labels[t] == im_end)
