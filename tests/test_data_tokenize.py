import copy
import math
import pickle

import pytest
import torch

from preftune.data import (
    Records,
    TokenizedPair,
    TokenizeSettings,
    collate_pairs,
    collate_pairs_fn,
    detect_format,
    tokenize_preferences,
)
from preftune.errors import DataError
from toydata import make_toy_preferences

PROMPT = "Describe the weather in a few words:"   # 10 tokens, 11 with BOS
CHOSEN = " gentle kind quiet warm soft"            # 5 tokens, 6 with EOS
REJECTED = " angry rude"                          # 2 tokens, 3 with EOS


def records(rows, name="data.jsonl"):
    return Records(name, rows, list(range(1, len(rows) + 1)))


def ids(tokenizer, text, special=False):
    return tokenizer(text, add_special_tokens=special)["input_ids"]


def tokenize(tokenizer, rows, **settings):
    pairs, report = tokenize_preferences(records(rows), tokenizer, TokenizeSettings(**settings))
    return pairs


def one_pair(tokenizer, **settings):
    return tokenize(tokenizer, [{"prompt": PROMPT, "chosen": CHOSEN, "rejected": REJECTED}], **settings)[0]


def test_prompt_ids_prefix_and_eos(tiny_tokenizer):
    rows = make_toy_preferences(20, seed=3)
    pairs = tokenize(tiny_tokenizer, rows)
    assert detect_format(records(rows)) == "standard"
    eos = tiny_tokenizer.eos_token_id
    for row, pair in zip(rows, pairs):
        assert pair.prompt_ids == ids(tiny_tokenizer, row["prompt"], special=True)
        assert pair.prompt_ids[0] == tiny_tokenizer.bos_token_id
        assert pair.chosen_ids == ids(tiny_tokenizer, row["chosen"]) + [eos]
        assert pair.rejected_ids == ids(tiny_tokenizer, row["rejected"]) + [eos]
    assert [p.row for p in pairs] == list(range(1, 21))


def test_no_bpe_merge_across_the_prompt_boundary(tiny_tokenizer):
    prompt, chosen = "Tell me about the river. It is ", "gentle"
    joint = ids(tiny_tokenizer, prompt + chosen, special=True)
    separate = ids(tiny_tokenizer, prompt, special=True) + ids(tiny_tokenizer, chosen)
    assert joint != separate  # the toy BPE merges " gentle" when tokenised as one string
    pair = tokenize(tiny_tokenizer, [{"prompt": prompt, "chosen": chosen, "rejected": "rude"}])[0]
    assert pair.prompt_ids + pair.chosen_ids == separate + [tiny_tokenizer.eos_token_id]
    assert pair.prompt_ids == ids(tiny_tokenizer, prompt, special=True)


def test_conversational_rows_use_the_chat_template(tiny_tokenizer):
    rows = make_toy_preferences(3, conversational=True)
    assert detect_format(records(rows)) == "conversational"
    pairs = tokenize(tiny_tokenizer, rows)
    for row, pair in zip(rows, pairs):
        prompt_text = f"<s><|user|>{row['prompt'][0]['content']}<|assistant|>"
        assert pair.prompt_ids == ids(tiny_tokenizer, prompt_text)
        assert pair.prompt_ids.count(tiny_tokenizer.bos_token_id) == 1
        assert pair.chosen_ids == ids(tiny_tokenizer, row["chosen"][0]["content"]) + [tiny_tokenizer.eos_token_id]
        full = tiny_tokenizer.apply_chat_template(row["prompt"] + row["rejected"], tokenize=False)
        assert tiny_tokenizer.decode(pair.prompt_ids + pair.rejected_ids) == full + "</s>"


def test_template_that_writes_eos_does_not_get_it_twice(tiny_tokenizer):
    tokenizer = copy.deepcopy(tiny_tokenizer)
    tokenizer.chat_template = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}"
                               "{% if m['role'] == 'assistant' %}{{ eos_token }}\n{% endif %}{% endfor %}"
                               "{% if add_generation_prompt %}<|assistant|>{% endif %}")
    pair = tokenize(tokenizer, make_toy_preferences(1, conversational=True))[0]
    assert pair.chosen_ids.count(tokenizer.eos_token_id) == 1
    assert pair.chosen_ids[-1] == tokenizer.eos_token_id


def test_a_reply_marked_as_never_ended_is_trained_without_eos(tiny_tokenizer):
    eos = tiny_tokenizer.eos_token_id
    row = {"prompt": PROMPT, "chosen": CHOSEN, "rejected": REJECTED, "chosen_ended": False}
    pair = tokenize(tiny_tokenizer, [row])[0]
    assert pair.chosen_ids == ids(tiny_tokenizer, CHOSEN) and not pair.chosen_ended
    assert pair.rejected_ids == ids(tiny_tokenizer, REJECTED) + [eos]
    # a chat template that closes the reply with an end-of-turn text: cut off, the reply stops at its content
    tokenizer = copy.deepcopy(tiny_tokenizer)
    tokenizer.chat_template = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}"
                               "{% if m['role'] == 'assistant' %}<|end|>{{ eos_token }}\n{% endif %}{% endfor %}"
                               "{% if add_generation_prompt %}<|assistant|>{% endif %}")
    chat = make_toy_preferences(1, conversational=True)[0]
    finished, cut = tokenize(tokenizer, [chat, {**chat, "rejected_ended": False}])
    content = chat["rejected"][0]["content"]
    assert tokenizer.decode(finished.rejected_ids).endswith("<|end|></s>")
    assert cut.rejected_ids == ids(tokenizer, content) and cut.chosen_ids == finished.chosen_ids
    with pytest.raises(DataError, match="chosen_ended"):
        tokenize(tiny_tokenizer, [{**row, "chosen_ended": "no"}])


def test_implicit_prompt_from_strings_stops_at_a_word_boundary(tiny_tokenizer):
    river = "Describe the river in a few words:"
    rows = [{"chosen": river + " calm kind", "rejected": river + " loud rude"},
            {"chosen": "Tell me about the city. It is gentle", "rejected": "Tell me about the city. It is gentler"}]
    assert detect_format(records(rows)) == "implicit_prompt"
    first, second = tokenize(tiny_tokenizer, rows)
    eos = tiny_tokenizer.eos_token_id
    assert first.prompt_ids == ids(tiny_tokenizer, "Describe the river in a few words:", special=True)
    assert first.chosen_ids == ids(tiny_tokenizer, " calm kind") + [eos]
    assert first.rejected_ids == ids(tiny_tokenizer, " loud rude") + [eos]
    assert second.prompt_ids == ids(tiny_tokenizer, "Tell me about the city. It is", special=True)
    assert second.chosen_ids == ids(tiny_tokenizer, " gentle") + [eos]
    assert second.rejected_ids == ids(tiny_tokenizer, " gentler") + [eos]


def test_implicit_prompt_from_messages_matches_explicit_prompt(tiny_tokenizer):
    explicit = make_toy_preferences(4, seed=1, conversational=True)
    implicit = [{"chosen": row["prompt"] + row["chosen"], "rejected": row["prompt"] + row["rejected"]}
                for row in explicit]
    assert detect_format(records(implicit)) == "implicit_prompt"
    assert tokenize(tiny_tokenizer, implicit) == tokenize(tiny_tokenizer, explicit)


def test_preference_prob_and_margin_are_carried_through(tiny_tokenizer):
    rows = make_toy_preferences(3)
    rows[0].update(preference_prob=0.7, margin=2.5)
    rows[1].update(preference_prob=None, margin=None)
    rows[2].update(preference_prob=1, margin=-3)
    pairs = tokenize(tiny_tokenizer, rows + make_toy_preferences(1))
    probs = [p.preference_prob for p in pairs]
    assert probs[0] == 0.7 and probs[2] == 1.0                      # a given 1.0 stays distinct from none:
    assert math.isnan(probs[1]) and math.isnan(probs[3])            # absent -> NaN (then 1 - label_smoothing)
    assert [p.margin for p in pairs] == [2.5, 0.0, -3.0, 0.0]


def test_no_truncation_when_it_fits(tiny_tokenizer):
    pair = one_pair(tiny_tokenizer, max_length=17)
    assert (len(pair.prompt_ids), len(pair.chosen_ids), len(pair.rejected_ids)) == (11, 6, 3)


def test_keep_end_drops_the_start_of_the_prompt_to_fit_the_longer_response(tiny_tokenizer):
    full = one_pair(tiny_tokenizer)
    pair = one_pair(tiny_tokenizer, max_length=12, truncation_mode="keep_end")
    assert pair.prompt_ids == full.prompt_ids[-6:]
    assert pair.chosen_ids == full.chosen_ids and pair.rejected_ids == full.rejected_ids
    with pytest.raises(DataError, match="needs at least 7 tokens .* but max_length is 6"):
        one_pair(tiny_tokenizer, max_length=6, truncation_mode="keep_end")


def test_keep_start_cuts_each_response_end_and_its_eos(tiny_tokenizer):
    full = one_pair(tiny_tokenizer)
    pair = one_pair(tiny_tokenizer, max_length=14, truncation_mode="keep_start")
    assert pair.prompt_ids == full.prompt_ids
    assert pair.chosen_ids == full.chosen_ids[:3]
    assert tiny_tokenizer.eos_token_id not in pair.chosen_ids
    assert pair.rejected_ids == full.rejected_ids  # 3 tokens fit, EOS kept
    with pytest.raises(DataError, match="needs at least 12 tokens .* but max_length is 11"):
        one_pair(tiny_tokenizer, max_length=11, truncation_mode="keep_start")


def test_error_mode_never_truncates(tiny_tokenizer):
    assert one_pair(tiny_tokenizer, max_length=17, truncation_mode="error") == one_pair(tiny_tokenizer)
    with pytest.raises(DataError, match="needs 17 tokens .* but max_length is 16"):
        one_pair(tiny_tokenizer, max_length=16, truncation_mode="error")
    with pytest.raises(DataError, match="prompt has 11 tokens but max_prompt_length is 4"):
        one_pair(tiny_tokenizer, max_prompt_length=4, truncation_mode="error")


def test_max_prompt_length_keeps_the_end_of_the_prompt(tiny_tokenizer):
    full = one_pair(tiny_tokenizer)
    pair = one_pair(tiny_tokenizer, max_prompt_length=4)
    assert pair.prompt_ids == full.prompt_ids[-4:]
    both = one_pair(tiny_tokenizer, max_prompt_length=4, max_length=7, truncation_mode="keep_start")
    assert (len(both.prompt_ids), len(both.chosen_ids), len(both.rejected_ids)) == (4, 3, 3)


def hand_made_pairs():
    return [TokenizedPair([1, 10], [11, 2], [12, 13, 2], preference_prob=0.7, margin=1.0, row=3),
            TokenizedPair([1, 20, 21], [2], [22, 2], preference_prob=1.0, margin=0.0, row=5)]


def test_collate_hand_made_batch():
    batch = collate_pairs(hand_made_pairs(), pad_token_id=0)
    assert batch["input_ids"].tolist() == [[1, 10, 11, 2, 0], [1, 20, 21, 2, 0],
                                           [1, 10, 12, 13, 2], [1, 20, 21, 22, 2]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1, 0], [1, 1, 1, 1, 0], [1, 1, 1, 1, 1], [1, 1, 1, 1, 1]]
    assert batch["completion_mask"].tolist() == [[False, False, True, True, False], [False, False, False, True, False],
                                                 [False, False, True, True, True], [False, False, False, True, True]]
    assert batch["input_ids"].dtype == torch.long and batch["attention_mask"].dtype == torch.long
    assert batch["completion_mask"].dtype == torch.bool
    assert batch["preference_prob"].dtype == torch.float32
    assert batch["preference_prob"].tolist() == pytest.approx([0.7, 1.0])
    assert batch["margin"].tolist() == [1.0, 0.0]
    assert batch["row"].tolist() == [3, 5] and batch["row"].dtype == torch.long


def test_collate_pads_to_a_multiple_and_fn_pickles():
    batch = collate_pairs(hand_made_pairs(), pad_token_id=7, pad_to_multiple_of=4)
    assert batch["input_ids"].shape == (4, 8)
    assert batch["input_ids"][0, 4:].tolist() == [7, 7, 7, 7]
    assert not batch["completion_mask"][:, 5:].any() and not batch["attention_mask"][:, 5:].any()
    collate = pickle.loads(pickle.dumps(collate_pairs_fn(7, pad_to_multiple_of=4)))
    assert torch.equal(collate(hand_made_pairs())["input_ids"], batch["input_ids"])


def test_collate_toy_dataset_through_a_dataloader(tiny_tokenizer):
    pairs = tokenize(tiny_tokenizer, make_toy_preferences(10))
    loader = torch.utils.data.DataLoader(pairs, batch_size=4, collate_fn=collate_pairs_fn(tiny_tokenizer.pad_token_id))
    batch = next(iter(loader))
    assert batch["input_ids"].shape[0] == 8
    expected = sum(len(p.chosen_ids) for p in pairs[:4]) + sum(len(p.rejected_ids) for p in pairs[:4])
    assert batch["completion_mask"].sum().item() == expected
    assert (batch["attention_mask"].sum(1) == batch["input_ids"].ne(tiny_tokenizer.pad_token_id).sum(1)).all()
