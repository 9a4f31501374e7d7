"""The chat template decides the text; the loss mask keeps exactly the assistant replies."""

from __future__ import annotations

import random
import re
from pathlib import Path

import pytest
import trl
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from posttrain import skills
from posttrain.formatting import DEMO_CHAT_TEMPLATE, IGNORE_INDEX, ChatFormat, TemplateError, record_messages
from posttrain.models import build_char_tokenizer

# Qwen2.5's chat template, verbatim: TRL ships the original to recognise Qwen2.5 tokenizers (and a
# weekly CI job of theirs checks it against the hub).
QWEN25_TEMPLATE = (Path(trl.__file__).parent / "chat_templates" / "qwen2_5.jinja").read_text()

THREE_TURNS = [
    {"role": "system", "content": "Answer in one word."},
    {"role": "user", "content": "copy ab"},
    {"role": "assistant", "content": "ab"},
    {"role": "user", "content": "upper cd"},
    {"role": "assistant", "content": "CD"},
    {"role": "user", "content": "sort ba"},
    {"role": "assistant", "content": "ab"},
]


def chatml_tokenizer(template: str = QWEN25_TEMPLATE) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer trained here, with Qwen's special tokens and template."""
    rng = random.Random(0)
    corpus = [f"{p} {a}" for p, a in (skills.sample(name, rng) for name in list(skills.SKILLS) * 50)]
    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    core.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=400, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, eos_token="<|endoftext|>", pad_token="<|endoftext|>", additional_special_tokens=specials[1:])
    tokenizer.chat_template = template
    return tokenizer


def trained_text(tokenizer, encoded: dict) -> str:
    return tokenizer.decode([token for token, label in zip(encoded["input_ids"], encoded["labels"]) if label != IGNORE_INDEX])


def test_the_demo_template_renders_the_demo_text_and_its_old_token_ids():
    tokenizer = build_char_tokenizer()
    chat = ChatFormat(tokenizer)
    assert tokenizer.chat_template == DEMO_CHAT_TEMPLATE
    assert chat.render(record_messages({"prompt": "reverse abc", "response": "cba"})) == "Q: reverse abc\nA: cba</s>"
    assert chat.prompt(record_messages({"prompt": "reverse abc"}, None)) == "Q: reverse abc\nA:"
    encoded = chat.encode_rows([{"prompt": "reverse abc", "response": "cba"}], max_length=96)[0]
    # What the stages trained on before chat templates: prompt ids, then " cba" + EOS as the completion.
    prompt = tokenizer("Q: reverse abc\nA:", add_special_tokens=False)["input_ids"]
    completion = tokenizer(" cba", add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    assert encoded["input_ids"] == prompt + completion
    assert encoded["labels"] == [IGNORE_INDEX] * len(prompt) + completion
    assert chat.stop_token_ids == [tokenizer.eos_token_id]


def test_the_demo_tokenizer_gives_one_id_per_character_and_survives_a_save(tmp_path):
    from posttrain.models import SPECIAL_TOKENS, load_tokenizer

    tokenizer = build_char_tokenizer()
    vocab = tokenizer.get_vocab()
    unk = vocab[SPECIAL_TOKENS["unk_token"]]
    text = "Héllo  wörld\t✓\n\n x</s>y<s>  "
    # By hand: every character its own id, unknown ones (é, ö, ✓, the tab) <unk> each; "</s>" and "<s>" whole.
    expected = []
    for piece in re.split(r"(</s>|<s>)", text):
        expected += [vocab[piece]] if piece in ("</s>", "<s>") else [vocab.get(char, unk) for char in piece]
    tokenizer.save_pretrained(tmp_path)
    for loaded in (tokenizer, load_tokenizer(tmp_path)):
        ids = loaded(text, add_special_tokens=False)["input_ids"]
        assert ids == expected
        assert ids.count(unk) == 4
        assert loaded.decode(loaded("reverse abc\nA: cba</s>", add_special_tokens=False)["input_ids"]) == "reverse abc\nA: cba</s>"


@pytest.mark.parametrize("template", ["chatml", "demo"])
def test_a_three_turn_chat_trains_on_exactly_the_assistant_replies(template):
    tokenizer = chatml_tokenizer() if template == "chatml" else build_char_tokenizer()
    chat = ChatFormat(tokenizer)
    end = "<|im_end|>" if template == "chatml" else "</s>"
    lead = "" if template == "chatml" else " "  # the demo's "A:" is followed by a space that belongs to the reply
    encoded = chat.encode_many([THREE_TURNS], max_length=1024)[0]
    assert encoded["input_ids"] == tokenizer(chat.render(THREE_TURNS), add_special_tokens=False)["input_ids"]  # the whole chat, as rendered
    assert trained_text(tokenizer, encoded) == f"{lead}ab{end}{lead}CD{end}{lead}ab{end}"
    last_only = chat.encode_many([THREE_TURNS], max_length=1024, train_on="last")[0]
    assert trained_text(tokenizer, last_only) == f"{lead}ab{end}"
    if template == "chatml":
        assert "Answer in one word." in tokenizer.decode(encoded["input_ids"])  # the system prompt is kept
        assert chat.end_of_turn == "<|im_end|>" and tokenizer.convert_tokens_to_ids("<|im_end|>") in chat.stop_token_ids


def test_a_record_with_messages_renders_its_turns():
    chat = ChatFormat(chatml_tokenizer())
    record = {"prompt": "flattened history", "response": "ab", "messages": THREE_TURNS}
    assert record_messages(record) == THREE_TURNS
    prompt = chat.prompt(record_messages(record, None))
    assert prompt.endswith("<|im_start|>user\nsort ba<|im_end|>\n<|im_start|>assistant\n") and "upper cd" in prompt
    single = chat.prompt(record_messages({"prompt": "copy ab"}, None))
    assert single.startswith("<|im_start|>system\nYou are Qwen, created by Alibaba Cloud.")  # the template's default system prompt


def test_pairs_split_into_prompt_and_replies_with_their_end_of_turn():
    tokenizer = chatml_tokenizer()
    [parts] = ChatFormat(tokenizer).split_replies([{"prompt": "upper ab", "chosen": "AB", "rejected": "AC"}])
    assert tokenizer.decode(parts["chosen_ids"]) == "AB<|im_end|>" and tokenizer.decode(parts["rejected_ids"]) == "AC<|im_end|>"
    assert tokenizer.decode(parts["prompt_ids"]).endswith("<|im_start|>assistant\n")


def test_the_fast_path_agrees_with_the_template_and_steps_aside_when_it_trims():
    trimming = QWEN25_TEMPLATE.replace("message.content + '<|im_end|>'", "message.content | trim + '<|im_end|>'")
    for template in (QWEN25_TEMPLATE, trimming):
        chat = ChatFormat(chatml_tokenizer(template))
        messages = [{"role": "user", "content": " padded "}, {"role": "assistant", "content": " x "}]
        assert chat.render(messages) == chat.tokenizer.apply_chat_template(messages, tokenize=False)
        assert "".join(text for text, _ in chat.segments(messages)) == chat.render(messages)
    assert ChatFormat(chatml_tokenizer(QWEN25_TEMPLATE))._single_turn is not None
    assert ChatFormat(chatml_tokenizer(trimming))._single_turn is None


def test_a_template_that_rewrites_earlier_turns_is_refused():
    # Renders only the last user turn: adding a turn changes the text before it.
    forgetful = "{%- for m in messages -%}{%- if loop.last or m.role == 'assistant' -%}{{ m.role + ': ' + m.content + '\n' }}{%- endif -%}{%- endfor -%}{%- if add_generation_prompt -%}assistant: {%- endif -%}"
    chat = ChatFormat(chatml_tokenizer(forgetful))
    with pytest.raises(TemplateError, match="prefix-preserving"):
        chat.encode_many([THREE_TURNS], max_length=1024)


def sentencepiece_style_tokenizer() -> PreTrainedTokenizerFast:
    """Llama-2/Mistral's shape: a normalizer that prepends "▁" and turns spaces into it, BPE with
    byte fallback, so a character outside the vocabulary becomes one token per UTF-8 byte."""
    from tokenizers import normalizers

    rng = random.Random(1)
    corpus = [f"{p} {a}" for p, a in (skills.sample(name, rng) for name in list(skills.SKILLS) * 30)]
    core = Tokenizer(models.BPE(byte_fallback=True, unk_token="<unk>"))
    core.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    specials = ["<unk>", "<s>", "</s>", *[f"<0x{byte:02X}>" for byte in range(256)]]
    core.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=400, special_tokens=specials))
    return PreTrainedTokenizerFast(tokenizer_object=core, eos_token="</s>", pad_token="</s>", unk_token="<unk>")


@pytest.mark.parametrize("kind", ["char", "chatml", "sentencepiece"])
def test_the_length_bound_is_never_below_the_token_count(kind):
    # The data stage keeps a row on this bound without tokenizing it, so a bound below the real
    # count would let an over-long row through. Mixed scripts, emoji, runs of spaces, newlines.
    tokenizer = {"char": build_char_tokenizer, "chatml": chatml_tokenizer, "sentencepiece": sentencepiece_style_tokenizer}[kind]()
    chat = ChatFormat(tokenizer)
    rng = random.Random(2)
    alphabet = list("abc XYZ 123 \n\t  ") + ["é", "ß", "中文", "🙂", "▁", "Ω", "<|im_end|>", "</s>"]
    records = []
    for _ in range(300):
        prompt = "".join(rng.choice(alphabet) for _ in range(rng.randint(1, 40)))
        reply = "".join(rng.choice(alphabet) for _ in range(rng.randint(1, 40)))
        records.append({"prompt": prompt, "response": reply})
    records.append({"prompt": "unused", "response": THREE_TURNS[-1]["content"], "messages": THREE_TURNS})
    conversations = [record_messages(record) for record in records]
    bounds = chat.length_bounds(conversations)
    assert chat.record_bounds(records) == bounds  # the same bound, without rendering single turns
    exact = [len(encoded["input_ids"]) for encoded in chat.encode_many(conversations, max_length=1 << 30)]
    assert all(bound >= count for bound, count in zip(bounds, exact)), [(b, c) for b, c in zip(bounds, exact) if b < c][:3]
    # and it is a useful bound: within a few bytes a character for plain ASCII text
    ascii_rows = [record_messages({"prompt": "sort " + "dcba" * 50, "response": "abcd" * 50})]
    assert chat.length_bounds(ascii_rows)[0] <= 2 * len(chat.encode_many(ascii_rows, max_length=1 << 30)[0]["input_ids"]) + 40
