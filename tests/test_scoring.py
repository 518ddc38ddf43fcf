"""One scoring module: every caller refuses a non-finite or miscounted score with an error naming the scorer;
load_callable names the option; chat-message prompts are accepted by eval and annotate import."""

import json
import math

import pytest
import torch

from helpers import write_jsonl
from preftune.cli import main
from preftune.config import PPOConfig
from preftune.errors import ConfigError, DataError, PreftuneError
from preftune.loading import load_callable
from preftune.scoring import FunctionScorer, as_scorer, check_scores, make_scorer

pytestmark = pytest.mark.usefixtures("one_thread")

CHAT = [{"role": "system", "content": "Be calm."}, {"role": "user", "content": "Describe the river in a few words:"}]


@pytest.fixture()
def bad_module(tmp_path):
    """A file with reward functions that go wrong in each way."""
    path = tmp_path / "bad_rewards.py"
    path.write_text("def nan_third(prompts, responses):\n"
                    "    return [float('nan') if i == 2 else 1.0 for i in range(len(responses))]\n\n"
                    "def inf_all(prompts, responses):\n    return [float('inf')] * len(responses)\n\n"
                    "def one_short(prompts, responses):\n    return [0.0] * (len(responses) - 1)\n")
    return path


def test_checks_name_the_scorer_index_and_value():
    assert check_scores("s", torch.tensor([1.0, 2.5]), 2) == [1.0, 2.5]
    with pytest.raises(PreftuneError, match=r"scorer 'judge-x' returned a score that is not a finite number: nan "
                                            r"for response 1"):
        check_scores("judge-x", [0.0, math.nan, 1.0], 3)
    with pytest.raises(PreftuneError, match=r"scorer 's' returned a score that is not a finite number: -inf"):
        check_scores("s", [-math.inf], 1)
    with pytest.raises(PreftuneError, match=r"scorer 's' returned 2 scores for 3 responses"):
        check_scores("s", [1, 2], 3)
    with pytest.raises(PreftuneError, match="one number per response"):
        check_scores("s", ["a"], 1)
    scorer = as_scorer(lambda p, r: [len(x) for x in r])
    assert scorer.score(["p", "q"], ["ab", "abcd"]) == [2.0, 4.0]
    with pytest.raises(PreftuneError, match="given 1 prompts for 2 responses"):
        scorer.score(["p"], ["a", "b"])


def test_load_callable_errors_name_the_option(bad_module):
    assert load_callable(f"{bad_module}:inf_all", "--judge").__name__ == "inf_all"
    with pytest.raises(ConfigError, match=r"^--judge 'x:y': cannot import module 'x'"):
        make_judge_spec("function:x:y")
    with pytest.raises(ConfigError, match=r"^reward_function 'math:nope': module 'math' has no attribute 'nope'"):
        FunctionScorer("math:nope", option="reward_function")
    with pytest.raises(ConfigError, match=r"^--judge 'math' must be written"):
        load_callable("math", "--judge")
    with pytest.raises(ConfigError, match=r"^--judge 'function' must look like"):
        make_scorer("function")


def make_judge_spec(spec):
    from preftune.scoring.judges import make_judge

    return make_judge(spec)


def test_ppo_rollout_refuses_non_finite_rewards(tmp_path, tiny_model, tiny_tokenizer, bad_module):
    from preftune.recipes.ppo import train_ppo

    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": f"Describe the river {i}"} for i in range(8)])

    def cfg(name, **extra):
        return PPOConfig(dataset=str(prompts), output_dir=str(tmp_path / name), per_device_batch_size=4,
                         max_new_tokens=3, max_steps=1, seed=0, **extra)

    with pytest.raises(PreftuneError, match=rf"scorer '{bad_module}:nan_third' returned a score that is not a finite "
                                            r"number: nan for response 2"):
        train_ppo(cfg("fn", reward_function=f"{bad_module}:nan_third"), model=tiny_model, tokenizer=tiny_tokenizer)
    with pytest.raises(PreftuneError, match=r"scorer 'always_inf' returned a score that is not a finite number: inf"):
        def always_inf(p, r):
            return torch.full((len(r),), math.inf)
        train_ppo(cfg("callable", reward_function=None), model=tiny_model, tokenizer=tiny_tokenizer, reward=always_inf)
    with pytest.raises(PreftuneError, match="returned 3 scores for 4 responses"):
        train_ppo(cfg("short", reward_function=f"{bad_module}:one_short"), model=tiny_model, tokenizer=tiny_tokenizer)


def test_eval_judge_refuses_non_finite_scores(tiny_model, tiny_tokenizer, bad_module):
    from preftune.evaluate.sampling import evaluate_policy
    from preftune.generate import SamplingSettings
    from preftune.scoring.judges import make_judge, win_rate

    judge = make_judge(f"function:{bad_module}:inf_all")
    settings = SamplingSettings(max_new_tokens=3)
    with pytest.raises(PreftuneError, match=rf"scorer '{bad_module}:inf_all' returned a score that is not a finite "
                                            r"number: inf for response 0"):
        evaluate_policy(tiny_model, tiny_tokenizer, ["Describe the river", "Describe the city"], settings, judge=judge)
    with pytest.raises(PreftuneError, match="not a finite number: nan for response 2"):
        win_rate(make_judge(f"function:{bad_module}:nan_third"), ["p"] * 3, ["a", "b", "c"], ["d", "e", "f"])


def test_annotation_ordering_refuses_non_finite_scores(tmp_path, bad_module):
    from sqlalchemy import select

    from preftune.annotate.db import Database
    from preftune.annotate.importer import ItemSpec, add_items, ensure_project
    from preftune.annotate.models import Item
    from preftune.annotate.ordering import rerank_project

    database = Database(f"sqlite:///{tmp_path / 'a.db'}")
    database.upgrade()
    with database.write() as session:
        project, _ = ensure_project(session, "demo", "pairwise")
        specs = [ItemSpec(f"i{i}", f"Prompt {i}", [f"a{i}", f"b{i}"]) for i in range(2)]
        add_items(session, project, specs + [ItemSpec("chat", "shown", ["a", "bbb"], {"prompt_messages": CHAT})],
                  seed=0)
    with pytest.raises(PreftuneError, match=rf"scorer '{bad_module}:nan_third' returned a score that is not a finite"):
        rerank_project(database, "demo", FunctionScorer(f"{bad_module}:nan_third"))
    with pytest.raises(PreftuneError, match="returned 5 scores for 6 responses"):
        rerank_project(database, "demo", FunctionScorer(f"{bad_module}:one_short"))
    seen = []

    def lengths(prompts, responses):
        seen.extend(prompts)
        return [len(text) for text in responses]

    assert rerank_project(database, "demo", lengths) == 3
    assert seen == ["Prompt 0"] * 2 + ["Prompt 1"] * 2 + [CHAT] * 2   # a conversation is scored as its messages
    with database.read() as session:
        assert sorted(session.scalars(select(Item.priority))) == [0.0, 0.0, 2.0]
    database.dispose()


def test_reward_model_scorer_refuses_nan_and_renders_chat_prompts(tiny_model_dir, tiny_tokenizer):
    from preftune.scoring.reward_model import RewardModelScorer, load_classifier, score_texts

    torch.manual_seed(0)
    model = load_classifier(str(tiny_model_dir), new_head=True)
    model.config.pad_token_id = tiny_tokenizer.pad_token_id
    scorer = RewardModelScorer("tiny", model=model, tokenizer=tiny_tokenizer, batch_size=2)
    rendered = tiny_tokenizer.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=True)
    expected = score_texts(model, tiny_tokenizer, [rendered, "Describe the city"], ["calm kind", "loud rude"],
                           prompt_special_tokens=False)
    plain = score_texts(model, tiny_tokenizer, ["Describe the city"], ["loud rude"])
    got = scorer.score([CHAT, "Describe the city"], ["calm kind", "loud rude"])
    assert got[0] == pytest.approx(expected[0], abs=1e-5) and got[1] == pytest.approx(plain[0], abs=1e-5)
    assert got[1] != pytest.approx(expected[1], abs=1e-6)  # a plain prompt keeps its BOS: another sequence
    with pytest.raises(ConfigError, match="batch_size must be a positive integer"):
        RewardModelScorer("tiny", model=model, tokenizer=tiny_tokenizer, batch_size=0)
    with torch.no_grad():
        model.score.weight.fill_(math.nan)
    with pytest.raises(PreftuneError, match=r"scorer 'reward model tiny' returned a score that is not a finite number"):
        scorer.score(["p"], ["calm"])


def test_misspelled_role_is_refused_with_a_suggestion(tmp_path, tiny_tokenizer):
    from preftune.data import TokenizeSettings, load_records, tokenize_preferences

    rows = [{"prompt": [{"role": "user", "content": "Hi"}], "chosen": [{"role": "assistant", "content": "calm"}],
             "rejected": [{"role": "asistant", "content": "loud"}]}]
    path = write_jsonl(tmp_path / "chat.jsonl", rows)
    with pytest.raises(DataError) as info:
        tokenize_preferences(load_records(str(path)), tiny_tokenizer, TokenizeSettings())
    assert str(info.value).endswith("chat.jsonl: row 1: field 'rejected': message 1 has an unknown role 'asistant'; "
                                    "did you mean 'assistant'? (roles are system, user, assistant, tool)")


def test_eval_accepts_message_prompts(tmp_path, tiny_model_dir, tiny_tokenizer, capsys):
    from preftune.generate import encode_prompts

    rendered = tiny_tokenizer.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=True)
    assert encode_prompts(tiny_tokenizer, [CHAT]) == [tiny_tokenizer(rendered, add_special_tokens=False)["input_ids"]]
    assert rendered.count("<s>") == 1 and rendered.endswith("<|assistant|>")
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": CHAT}, {"prompt": "Describe the city"}])
    code = main(["eval", "--model", str(tiny_model_dir), "--prompts", str(prompts), "--max_new_tokens", "3",
                 "--judge", "function:preftune.demo.sentiment:sentiment_reward",
                 "--output_dir", str(tmp_path / "out")])
    assert code == 0
    samples = [json.loads(line) for line in (tmp_path / "out" / "samples.jsonl").read_text().splitlines()]
    assert [s["prompt"] for s in samples] == [CHAT, "Describe the city"]
    assert all(isinstance(s["score"], float) for s in samples)
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "fine"}, {"prompt": [{"role": "asistant", "content": "x"}]}])
    code = main(["eval", "--model", str(tiny_model_dir), "--prompts", str(bad), "--output_dir", str(tmp_path / "o2")])
    err = capsys.readouterr().err
    assert code == 2 and "bad.jsonl: row 2: field 'prompt': message 1 has an unknown role 'asistant'; did you mean " \
                          "'assistant'?" in " ".join(err.split())


def test_annotate_import_accepts_message_prompts(tmp_path, tiny_model_dir, tiny_tokenizer):
    from preftune.annotate.importer import generate_candidates, read_items

    path = write_jsonl(tmp_path / "items.jsonl", [{"prompt": CHAT, "responses": ["calm", "loud"]},
                                                  {"prompt": "Describe the city", "responses": ["kind", "rude"]}])
    first, second = read_items(str(path))
    assert first.prompt == "system: Be calm.\n\nuser: Describe the river in a few words:"
    assert first.meta["prompt_messages"] == CHAT and first.model_prompt == CHAT
    assert second.model_prompt == "Describe the city" and "prompt_messages" not in second.meta
    generate_candidates([first], str(tiny_model_dir), n=2, sampling={"max_new_tokens": 3, "temperature": 2.0}, seed=0)
    assert len(first.candidates) >= 3
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": [{"role": "usr", "content": "Hi"}], "responses": ["a", "b"]}])
    with pytest.raises(DataError, match=r"bad.jsonl: row 1: field 'prompt': message 1 has an unknown role 'usr'; "
                                        r"did you mean 'user'\?"):
        read_items(str(bad))
