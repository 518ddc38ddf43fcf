"""The reward-model scoring convention (preftune.scoring.reward_model) is TRL's: a reward model trained by preftune
scores a (prompt, response) exactly as it scores the input TRL's RewardTrainer and GRPO's reward models build, and
training tokenises conversations that same way. The TRL-style inputs are built here by hand, as TRL builds them."""

import copy

import pytest
import torch

from helpers import read_jsonl, write_jsonl
from preftune.config import RewardConfig
from preftune.data import TokenizeSettings, load_records, tokenize_preferences
from preftune.recipes.reward import train_reward
from preftune.scoring.files import score_file
from preftune.scoring.reward_model import load_reward_model, score_texts
from toydata import make_toy_preferences

pytestmark = pytest.mark.usefixtures("one_thread")

# a ChatML-like template: every turn ends with EOS and a newline, as Qwen's and SmolLM2's end with <|im_end|>\n
TURN_END_TEMPLATE = ("{{ bos_token }}{% for message in messages %}<|{{ message['role'] }}|>{{ message['content'] }}"
                     "{{ eos_token }}\n{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}")


@pytest.fixture(scope="module")
def chat_model_dir(tmp_path_factory, tiny_tokenizer):
    from preftune.toy import build_tiny_llama

    tokenizer = copy.deepcopy(tiny_tokenizer)
    tokenizer.chat_template = TURN_END_TEMPLATE
    path = tmp_path_factory.mktemp("chat-llama")
    build_tiny_llama(tokenizer).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def reward_dir(chat_model_dir, tmp_path_factory):
    """A reward model trained by preftune on conversations (a few steps: its scores differ between inputs)."""
    root = tmp_path_factory.mktemp("convention")
    data = write_jsonl(root / "pairs.jsonl", make_toy_preferences(32, seed=1, conversational=True))
    cfg = RewardConfig(model_name_or_path=str(chat_model_dir), dataset=str(data), output_dir=str(root / "run"),
                       per_device_batch_size=8, learning_rate=3e-3, max_length=64, max_steps=4, warmup_ratio=0.0,
                       seed=0, logging_steps=2)
    return train_reward(cfg).model_dir


PROMPT = [{"role": "user", "content": "Describe the harbour in a few words:"}]
RESPONSES = ["calm gentle quiet", "LOUD angry harsh"]


def trl_conversation_ids(tokenizer, prompt, response) -> list[int]:
    """TRL's RewardTrainer on conversational data: apply_chat_template(prompt + chosen), tokenized."""
    return list(tokenizer.apply_chat_template(prompt + [{"role": "assistant", "content": response}], tokenize=True,
                                              return_dict=True)["input_ids"])


def trl_grpo_ids(tokenizer, prompt, response) -> list[int]:
    """TRL's GRPO reward model on conversational prompts: the conversation rendered to text, then tokenized without
    special tokens."""
    text = tokenizer.apply_chat_template(prompt + [{"role": "assistant", "content": response}], tokenize=False)
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def transformers_scores(model, ids_rows: list[list[int]], pad_token_id: int) -> list[float]:
    """What TRL computes: the classifier's own forward on right-padded rows (it reads the last non-pad token)."""
    width = max(map(len, ids_rows))
    ids = torch.full((len(ids_rows), width), pad_token_id)
    mask = torch.zeros_like(ids)
    for row, values in enumerate(ids_rows):
        ids[row, :len(values)], mask[row, :len(values)] = torch.tensor(values), 1
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask).logits.squeeze(-1).tolist()


def test_training_tokenises_a_conversation_as_trl_does(chat_model_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(chat_model_dir)
    records = load_records_from([{"prompt": PROMPT, "chosen": [{"role": "assistant", "content": RESPONSES[0]}],
                                  "rejected": [{"role": "assistant", "content": RESPONSES[1]}]}], chat_model_dir)
    [reward_pair], _ = tokenize_preferences(records, tokenizer, TokenizeSettings(max_length=256, whole_turn=True))
    [policy_pair], _ = tokenize_preferences(records, tokenizer, TokenizeSettings(max_length=256))
    for response, ids in zip(RESPONSES, (reward_pair.chosen_ids, reward_pair.rejected_ids)):
        assert reward_pair.prompt_ids + ids == trl_conversation_ids(tokenizer, PROMPT, response)
        assert reward_pair.prompt_ids + ids == trl_grpo_ids(tokenizer, PROMPT, response)
    newline = tokenizer("\n", add_special_tokens=False)["input_ids"]
    assert reward_pair.chosen_ids[-1 - len(newline):] == [tokenizer.eos_token_id] + newline   # the turn's end, whole
    assert policy_pair.chosen_ids[-1] == tokenizer.eos_token_id   # a policy still learns to stop at EOS


def load_records_from(rows, where):
    return load_records(str(write_jsonl(where / "one-row.jsonl", rows)))


def test_preftune_scores_equal_trl_style_scores_of_a_preftune_reward_model(reward_dir, tmp_path):
    from transformers import AutoModelForSequenceClassification

    model, tokenizer = load_reward_model(reward_dir, "cpu")
    ours = score_texts(model, tokenizer, [PROMPT, PROMPT], RESPONSES)
    hf = AutoModelForSequenceClassification.from_pretrained(reward_dir).eval()   # as TRL loads it
    trl_trainer = transformers_scores(hf, [trl_conversation_ids(tokenizer, PROMPT, r) for r in RESPONSES],
                                      tokenizer.pad_token_id)
    trl_grpo = transformers_scores(hf, [trl_grpo_ids(tokenizer, PROMPT, r) for r in RESPONSES],
                                   tokenizer.pad_token_id)
    assert ours == pytest.approx(trl_trainer, abs=1e-5) and ours == pytest.approx(trl_grpo, abs=1e-5)
    assert abs(ours[0] - ours[1]) > 1e-3   # the two responses score differently: the comparison means something
    # `preftune score` on a file of TRL's conversational prompt/completion rows gives the same numbers
    rows = [{"prompt": PROMPT, "completion": [{"role": "assistant", "content": r}]} for r in RESPONSES]
    scored = score_file(reward_dir, write_jsonl(tmp_path / "rows.jsonl", rows), tmp_path / "scored.jsonl")
    assert [row["reward"] for row in read_jsonl(scored.output)] == pytest.approx(trl_trainer, abs=1e-5)


def test_plain_text_is_prompt_response_and_eos_as_trl_tokenises_it(reward_dir):
    from transformers import AutoModelForSequenceClassification

    model, tokenizer = load_reward_model(reward_dir, "cpu")
    prompt, responses = "Describe the harbour in a few words:", [" calm gentle quiet", " LOUD angry harsh"]
    ours = score_texts(model, tokenizer, [prompt, prompt], responses)
    trl_ids = [list(tokenizer(prompt + r + tokenizer.eos_token)["input_ids"]) for r in responses]   # BOS included
    hf = AutoModelForSequenceClassification.from_pretrained(reward_dir).eval()
    assert ours == pytest.approx(transformers_scores(hf, trl_ids, tokenizer.pad_token_id), abs=1e-5)
