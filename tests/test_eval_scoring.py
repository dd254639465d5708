"""Answer extraction in every dev script, seeded k-shot prompts, option log-likelihood and greedy generation on a tiny
Qwen2 trained here to always answer (C)."""

from __future__ import annotations

import itertools
import random

import pytest

from apollo_ray import languages as langs
from apollo_ray.config import BenchmarkConfig
from apollo_ray.evaluation.benchmark import Item, load_benchmark
from apollo_ray.evaluation.prompts import (TEMPLATES, PromptTooLong, ShotPool, build_prompt, continuations,
                                           encode, select_shots)
from apollo_ray.evaluation.scoring import extract_answer, generate_answers, loglik_scores, score_options
from apollo_ray.storage import Storage

# ------------------------------------------------------------------------------------------------ answer extraction
EXTRACTION_CASES = [
    # en: parenthesised letters, the majority, ties to the first written, first non-empty line only
    ("The correct answer is (B).", "B"),
    ("The correct answer is (b)", "B"),
    ("(A) is tempting, but (C) fits; so (C).", "C"),
    ("Either (D) or (A).", "D"),
    ("\n\n  \n(D) Hemoptysis.\nThe correct answer is (A).", "D"),
    ("Let me think.\nThe correct answer is (A).", None),
    ("Answer: C", "C"),
    ("Based on the findings, E", "E"),  # the reference would count the B of "Based" too
    ("Yes.", "A"),
    ("no", "B"),
    ("I do not know.", None),
    ("", None),
    # zh: ASCII letters in full-width brackets (the reference reads these), full-width letters, no word spaces
    ("正确答案是（B）。", "B"),
    ("正确答案是(C)", "C"),
    ("答案：（Ｄ）", "D"),
    ("答案是B。", "B"),
    ("（A）（B）（B）", "B"),
    # es, fr
    ("La respuesta correcta es (D).", "D"),
    ("La respuesta correcta es la D", "D"),
    ("La bonne réponse est (E).", "E"),
    ("Réponse : B", "B"),
    # ar: Latin labels in Arabic text, Arabic labels bracketed or bare, never a bracketed word's first letter
    ("الإجابة الصحيحة هي (A).", "A"),
    ("الإجابة الصحيحة هي (ب).", "B"),
    ("الإجابة الصحيحة هي ج", "C"),
    ("(بالتأكيد) د", "D"),
    ("هـ) صحيح", "E"),
    ("(س)", "C"),
    # hi
    ("सही उत्तर है (C)।", "C"),
    ("सही उत्तर है B", "B"),
]


@pytest.mark.parametrize("text,expected", EXTRACTION_CASES)
def test_extract_answer(text, expected):
    assert extract_answer(text) == expected


# The tiers, highest first: a line's answer comes from the highest tier present in it, lower tiers being ignored.
TIERS = [
    ("parenthesised", ["(C)", "(C)", "（ج）"], "C"),  # Latin and Arabic bracketed labels count together
    ("bare arabic", ["د"], "D"),
    ("bare latin", ["B"], "B"),
]


@pytest.mark.parametrize("top", range(len(TIERS)))
def test_extraction_order_the_highest_tier_wins_wherever_it_is_written(top):
    """A second view of the order (the table above checks single cases): every arrangement of the top tier's labels
    with every lower tier's labels and filler gives the top tier's answer."""
    _, labels, expected = TIERS[top]
    lower = [label for _, ls, _ in TIERS[top + 1:] for label in ls]
    for lower_part in (lower, lower[::-1]):
        for words in {p for p in itertools.permutations([*labels, *lower_part, "so"])}:
            line = " ".join(words)
            assert extract_answer(line) == expected, line
            assert extract_answer(f"{line}\n(A) (A) (A)") == expected, line  # only the first non-empty line
            assert extract_answer(f"\n  \n{line}") == expected, line
    # Yes/No is read only when no tier has a label, and only as the whole line
    assert extract_answer(f"Yes {labels[0]}") == expected and extract_answer(f"No, {labels[0]}") == expected


def test_extraction_majority_then_first_written_across_scripts():
    assert extract_answer("(ب) (A) (A)") == "A"  # Arabic-bracketed and Latin parenthesised labels are counted together
    assert extract_answer("(ب) (A)") == "B" and extract_answer("(A) (ب)") == "A"  # a tie goes to the first written
    assert extract_answer("（Ｄ） (B) (D)") == "D"  # full-width letters count as the ASCII letter
    assert extract_answer("C or B") == "C" and extract_answer("B, C, C") == "C"  # bare letters: majority, then first
    assert extract_answer("  yes . ") == "A" and extract_answer("Yes, it is.") is None


def test_fullwidth_letters_are_a_deliberate_extension():
    assert extract_answer("答案：（Ｄ）", fullwidth_letters=False) is None  # what the reference reads
    assert extract_answer("答案：（D）", fullwidth_letters=False) == "D"


# ---------------------------------------------------------------------------------------------------------- prompts
WORDS = ("fever cough renal cardiac insulin dose acute chronic liver nerve artery lesion infant biopsy sepsis tumor "
         "anemia vaccine asthma stroke").split()


def make_items(n: int = 24, seed: int = 0) -> list[Item]:
    rng = random.Random(seed)
    specs = [("en", "medqa-usmle"), ("en", "pubmedqa"), ("zh", "cmexam"), ("fr", "frenchmedmcqa"), ("sw", "kenya-mcq")]
    items = []
    for i in range(n):
        lang, source = specs[i % len(specs)]
        k = rng.randint(3, 5)
        options = tuple((chr(65 + j), " ".join(rng.sample(WORDS, 2))) for j in range(k))
        items.append(Item(id=f"{lang}-{i}", language=lang, source=source,
                          question=" ".join(rng.sample(WORDS, rng.randint(4, 12))) + "?", options=options,
                          answer=chr(65 + rng.randrange(k)),
                          context=" ".join(rng.sample(WORDS, 8)) if source == "pubmedqa" else ""))
    return items


def test_templates_cover_the_majors():
    assert set(TEMPLATES) == set(langs.MAJORS)
    for lang, tpl in TEMPLATES.items():
        assert "{last}" in tpl.instruction and tpl.answer_line("B").startswith(tpl.cue), lang


def test_prompt_layout_shots_and_languages():
    items = make_items()
    pool = ShotPool(items)
    en, zh, sw, pub = (next(it for it in items if it.source == s) for s in
                       ("medqa-usmle", "cmexam", "kenya-mcq", "pubmedqa"))
    p = build_prompt(en, pool, k=3, seed=1)
    assert p.startswith("User:You are a medical doctor") and p.endswith("\nAssistant:The correct answer is")
    assert p.count("The correct answer is (") == 3 and p.count("Question: ") == 4
    assert f"Question: {en.question}\nOptions:\n{en.options_text()}\nAssistant:" in p
    for shot in select_shots(en, pool, 3, 1):
        assert shot.source == en.source and shot.id != en.id
        assert f"{shot.question}\nOptions:\n{shot.options_text()}\nThe correct answer is ({shot.answer})." in p
    pz = build_prompt(zh, pool, k=2, seed=1)
    assert "请从A到" in pz and pz.count("正确答案是(") == 2 and pz.endswith("Assistant:正确答案是")
    assert build_prompt(sw, pool, k=0, seed=1).startswith("User:You are a medical doctor")  # minor: English
    assert f"Context: {pub.context}\nQuestion: {pub.question}" in build_prompt(pub, pool, k=1, seed=1)
    assert continuations(en)[:2] == [" (A)", " (B)"] and continuations(zh)[0] == "(A)"


def test_shots_are_seeded_and_never_the_item_itself():
    items = make_items()
    assert [build_prompt(it, items, 3, seed=7) for it in items] == \
           [build_prompt(it, list(reversed(items)), 3, seed=7) for it in items]  # pool order does not matter
    assert any(select_shots(it, items, 3, 7) != select_shots(it, items, 3, 8) for it in items)
    dev_copy = [Item(**{**it.__dict__, "id": f"dev-{it.id}"}) for it in items]  # same content, other ids
    for it in items:
        assert all(s.question != it.question for s in select_shots(it, dev_copy, 3, 7))
    multi = Item(id="en-x", language="en", source="medqa-usmle", question="q", options=items[0].options,
                 answer="A", answers=("A", "B"))
    assert multi not in select_shots(items[0], [*items, multi], 50, 0)


def test_shots_are_shed_before_the_item_is_dropped():
    items = make_items()
    it = items[0]
    lengths = [len(build_prompt(it, items, k, seed=3)) for k in range(4)]
    assert lengths == sorted(lengths) and len(set(lengths)) == 4
    for k in range(4):  # a budget that fits exactly k shots keeps exactly k
        p = build_prompt(it, items, 3, seed=3, max_tokens=lengths[k])
        assert p == build_prompt(it, items, k, seed=3) and p.count("The correct answer is (") == k
    with pytest.raises(PromptTooLong) as e:
        build_prompt(it, items, 3, seed=3, max_tokens=lengths[0] - 1)
    assert e.value.reason == "prompt_too_long" and e.value.item_id == it.id


def test_real_dev_prompts_are_reproducible_and_fit_4096_characters(xmedbench_dev):
    items, _ = load_benchmark(BenchmarkConfig(name="dev", path=str(xmedbench_dev)), Storage("/nonexistent-root"))
    pool = ShotPool(items)
    first = [build_prompt(it, pool, 3, seed=1234, max_tokens=4096) for it in items]
    assert first == [build_prompt(it, ShotPool(items[::-1]), 3, seed=1234, max_tokens=4096) for it in items]
    cues = {it.id: TEMPLATES[it.language].cue + TEMPLATES[it.language].sep + "(" for it in items}
    shots = [p.count(cues[it.id]) for it, p in zip(items, first)]
    assert all(len(p) <= 4096 for p in first) and 0 < shots.count(3) < len(items)  # long items shed shots


# ------------------------------------------------------------------------------------------------------- tiny model
STEPS = 20


@pytest.fixture(scope="module")
def tiny(one_thread):
    """A byte-level BPE tokenizer and a 2-layer Qwen2 trained 20 steps to answer every prompt with (C)."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

    items = make_items(40)
    texts = [build_prompt(it, items, 1, seed=0) + continuations(it)[2] + "." for it in items]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=400, special_tokens=["<|endoftext|>", "<|pad|>"],
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                                       show_progress=False))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|pad|>")
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(Qwen2Config(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=1024, tie_word_embeddings=False,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id))
    # the loss is on the answer only: the model learns "(C)" after the cue, not the random words of the questions
    prompts = [build_prompt(it, items, 0, seed=0) for it in items]
    answers = [encode(tokenizer, p + continuations(it)[2] + ".") + [tokenizer.eos_token_id]
               for p, it in zip(prompts, items)]
    width = max(map(len, answers))
    ids = torch.full((len(answers), width), tokenizer.pad_token_id)
    labels = torch.full_like(ids, -100)
    mask = torch.zeros_like(ids)
    for r, (p, s) in enumerate(zip(prompts, answers)):
        ids[r, :len(s)] = torch.tensor(s)
        mask[r, :len(s)] = 1
        n = len(encode(tokenizer, p))
        labels[r, n:len(s)] = ids[r, n:len(s)]
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(STEPS):
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    return model, tokenizer, make_items(12, seed=99)  # held-out items


def test_loglik_picks_the_option_the_model_prefers(tiny):
    model, tokenizer, items = tiny
    prompts = [build_prompt(it, items, 1, seed=0, tokenizer=tokenizer) for it in items]
    scores = score_options(model, tokenizer, prompts, items)
    assert [s.predicted for s in scores] == ["C"] * len(items)
    for s in scores:
        c = s.letters.index("C")
        assert all(s.sums[c] > v + 1.0 for j, v in enumerate(s.sums) if j != c)
        assert len(s.sums) == len(s.means) == len(s.letters)


def test_batched_scoring_equals_one_by_one(tiny):
    model, tokenizer, items = tiny
    prompts = [build_prompt(it, items, k, seed=0, tokenizer=tokenizer) for it, k in zip(items, [0, 1, 2, 3] * 3)]
    options = [continuations(it) for it in items]
    batched = loglik_scores(model, tokenizer, prompts, options, "cpu", batch_rows=32)
    single = [loglik_scores(model, tokenizer, [p], [o], "cpu", batch_rows=1)[0] for p, o in zip(prompts, options)]
    assert len({len(encode(tokenizer, p)) for p in prompts}) > 1  # padding was exercised
    for b, s in zip(batched, single):
        assert b == pytest.approx(s, abs=1e-4)


def test_loglik_matches_a_plain_unpadded_forward(tiny):
    torch = pytest.importorskip("torch")
    model, tokenizer, items = tiny
    it = items[0]
    prompt = build_prompt(it, items, 2, seed=0)
    got = loglik_scores(model, tokenizer, [prompt], [continuations(it)], "cpu", mean=False)[0]
    ctx = encode(tokenizer, prompt)
    for cont_text, value in zip(continuations(it), got):
        whole = encode(tokenizer, prompt + cont_text)
        with torch.no_grad():
            lp = torch.log_softmax(model(torch.tensor([whole])).logits[0].float(), -1)
        expected = sum(float(lp[p - 1, whole[p]]) for p in range(len(ctx), len(whole)))
        assert value == pytest.approx(expected, abs=1e-4)

    class NoKeep(torch.nn.Module):  # a model without logits_to_keep takes the full-logits path
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, input_ids, attention_mask=None, position_ids=None, cache=None, use_cache=None):
            return self.inner(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                              cache=cache, use_cache=use_cache)

    full = loglik_scores(NoKeep(model), tokenizer, [prompt], [continuations(it)], "cpu")[0]
    assert full == pytest.approx(got, abs=1e-4)


def test_greedy_generation_batched_and_extracted(tiny):
    model, tokenizer, items = tiny
    prompts = [build_prompt(it, items, k, seed=0, tokenizer=tokenizer) for it, k in zip(items, [0, 2, 1] * 4)]
    batched = generate_answers(model, tokenizer, prompts, max_new_tokens=4, batch_size=6)
    single = [generate_answers(model, tokenizer, [p], max_new_tokens=4)[0] for p in prompts]
    assert batched == single
    assert [extract_answer(o) for o in batched] == ["C"] * len(items)


def test_chat_template_rendering(tiny):
    _, tokenizer, items = tiny
    chat = tokenizer.__class__(tokenizer_object=tokenizer.backend_tokenizer, eos_token="<|endoftext|>",
                               pad_token="<|pad|>")
    chat.chat_template = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
                          "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    p = build_prompt(items[0], items, 1, seed=0, tokenizer=chat)
    assert p.startswith("<|im_start|>user\nYou are a medical doctor")
    assert p.endswith("<|im_end|>\n<|im_start|>assistant\nThe correct answer is")
    n0 = len(encode(chat, build_prompt(items[0], items, 0, seed=0, tokenizer=chat)))
    p = build_prompt(items[0], items, 3, seed=0, tokenizer=chat, max_tokens=n0)  # token budget sheds every shot
    assert p.count("The correct answer is (") == 0
