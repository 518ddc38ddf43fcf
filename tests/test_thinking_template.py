"""Templates whose generation prompt is not a prefix of the rendered conversation (Qwen3 / DeepSeek-R1 style).

The template below opens the assistant's turn with ``<think>`` when asked for a generation prompt, but a
finished conversation renders the reply without it, as thinking templates do. Such data trains on the
prompt rendered for generation and the reply's content plus the template's end-of-turn text.
"""

import copy
import json

import pytest

from preftune.data import TokenizeSettings, load_records, tokenize_preferences
from preftune.data.messages import _NOTICED
from preftune.data.text import SFTSettings, tokenize_sft

THINKING = ("{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}</s>\n{% endfor %}"
            "{% if add_generation_prompt %}<|assistant|><think>\n{% endif %}")
USER = [{"role": "user", "content": "Describe the river in a few words:"}]


def reply(text):
    return [{"role": "assistant", "content": text}]


@pytest.fixture()
def thinking(tiny_tokenizer):
    tokenizer = copy.deepcopy(tiny_tokenizer)
    tokenizer.chat_template = THINKING
    _NOTICED.discard(THINKING)
    return tokenizer


def write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def ids(tokenizer, text):
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def test_preference_pairs_train_after_the_generation_prompt(thinking, tmp_path, capsys):
    generation_prompt = "<s><|user|>Describe the river in a few words:</s>\n<|assistant|><think>\n"
    assert thinking.apply_chat_template(USER, tokenize=False, add_generation_prompt=True) == generation_prompt
    assert not thinking.apply_chat_template(USER + reply("calm"), tokenize=False).startswith(generation_prompt)
    rows = [{"prompt": USER, "chosen": reply("calm and quiet"), "rejected": reply("loud")}] * 2
    pairs, _ = tokenize_preferences(load_records(write(tmp_path / "p.jsonl", rows)), thinking, TokenizeSettings())
    eos = thinking.eos_token_id
    for pair in pairs:
        assert pair.prompt_ids == ids(thinking, generation_prompt)
        # the content, then the template's end of turn "</s>\n": its EOS text becomes the one EOS id
        assert pair.chosen_ids == ids(thinking, "calm and quiet") + [eos]
        assert pair.rejected_ids == ids(thinking, "loud") + [eos]
    assert capsys.readouterr().err.count("generation prompt is not a prefix") == 1    # said once


def test_sft_keeps_the_templates_end_of_turn_after_the_content(thinking, tmp_path):
    rows = [{"prompt": USER, "completion": reply("calm")}, {"messages": USER + reply("calm")}]
    for i, row in enumerate(rows):
        examples, _ = tokenize_sft(load_records(write(tmp_path / f"sft{i}.jsonl", [row])), thinking, SFTSettings())
        prompt = ids(thinking, thinking.apply_chat_template(USER, tokenize=False, add_generation_prompt=True))
        completion = ids(thinking, "calm</s>\n")
        assert examples[0].input_ids == prompt + completion
        assert examples[0].loss_mask == [False] * len(prompt) + [True] * len(completion)
