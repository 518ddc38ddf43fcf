"""``preftune iterate``: selection rules, rounds that raise an oracle's reward, and exact kill-and-resume."""

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from preftune.cli import main
from preftune.config import IterateConfig
from preftune.errors import ConfigError
from preftune.iterate import rounds as iterate_module
from preftune.iterate.rounds import train_iterate
from preftune.iterate.select import round_robin, select_rows
from toydata import calm_count, calm_minus_loud, toy_prompt_rows

TESTS = Path(__file__).resolve().parent


def write_rows(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def toy_run(tmp_path_factory, tiny_tokenizer):
    """A tiny random Llama and toy prompt files (training and held-out)."""
    from preftune.toy import build_tiny_llama

    root = tmp_path_factory.mktemp("iterate")
    build_tiny_llama(tiny_tokenizer).save_pretrained(root / "init")
    tiny_tokenizer.save_pretrained(root / "init")
    write_rows(root / "train.jsonl", toy_prompt_rows(32, seed=0))
    write_rows(root / "eval.jsonl", toy_prompt_rows(16, seed=1))
    return root


def toy_settings(root: Path, out: str, **extra) -> dict:
    values = dict(model_name_or_path=str(root / "init"), dataset=str(root / "train.jsonl"),
                  eval_dataset=str(root / "eval.jsonl"), eval_split="train", output_dir=str(root / out), rounds=3,
                  samples_per_prompt=8, max_new_tokens=16, max_length=64, learning_rate=1e-2, max_steps=10,
                  per_device_batch_size=8, beta=0.1, warmup_ratio=0.0, logging_steps=5, eval_samples_per_prompt=4,
                  missing_eos="keep")   # the random toy model seldom ends within 16 tokens: its replies are kept
    values.update(extra)
    return values


def toy_config(root: Path, out: str, **extra) -> IterateConfig:
    return IterateConfig(**toy_settings(root, out, **extra))


# ---------------------------------------------------------------------- selection


def select_config(**extra) -> IterateConfig:
    return IterateConfig(model_name_or_path="m", dataset="d", **extra)


def test_best_worst_keeps_one_pair_per_prompt_and_drops_close_scores():
    cfg = select_config(min_score_gap=0.5)
    rows, stats = select_rows(cfg, ["p1", "p2", "p3"], [["a", "b", "c"], ["x", "y"], ["", "z"]],
                              [[0.2, 1.0, -0.3], [0.1, 0.4], [-1.0, 3.0]])
    assert rows == [{"prompt": "p1", "chosen": "b", "rejected": "c", "score_chosen": 1.0, "score_rejected": -0.3}]
    # p2: gap 0.3 <= 0.5 dropped; p3: an empty text cannot be trained on, dropped
    assert stats == {"pairs_considered": 3, "pairs_kept": 1, "pairs_dropped": 2, "samples_ended": 1.0,
                     "samples_unfinished_dropped": 0}


def test_all_pairs_carry_margin_and_soft_labels_from_the_score_difference():
    cfg = select_config(selection="all_pairs", margin_scale=2.0, preference_prob_scale=1.5)
    prompt = [{"role": "user", "content": "hi"}]
    rows, stats = select_rows(cfg, [prompt], [["a", "b", "c"]], [[0.0, 1.0, 0.0]])
    assert {k: stats[k] for k in ("pairs_considered", "pairs_kept", "pairs_dropped")} == {
        "pairs_considered": 3, "pairs_kept": 2, "pairs_dropped": 1}  # a and c tie
    assert [(r["chosen"][0]["content"], r["rejected"][0]["content"]) for r in rows] == [("b", "a"), ("b", "c")]
    assert rows[0]["chosen"] == [{"role": "assistant", "content": "b"}] and rows[0]["prompt"] == prompt
    assert rows[0]["margin"] == pytest.approx(2.0)
    assert rows[0]["preference_prob"] == pytest.approx(1 / (1 + math.exp(-1.5)))


def test_kto_takes_the_best_as_desirable_and_the_worst_as_undesirable():
    cfg = select_config(loss_type="kto", selection="all_pairs")
    rows, stats = select_rows(cfg, ["p"], [["a", "b", "c"]], [[0.5, 2.0, -1.0]])
    assert [(r["completion"], r["label"], r["score"]) for r in rows] == [("b", True, 2.0), ("c", False, -1.0)]
    assert stats["pairs_kept"] == 1


def test_unfinished_samples_are_never_chosen_or_rejected_by_default():
    cfg = select_config()   # missing_eos defaults to drop
    # the cut-off "long long long" has the best score and "x" (cut off too) the worst: neither may be picked
    rows, stats = select_rows(cfg, ["p1", "p2"], [["long long long", "fine.", "ok.", "x"], ["a", "b"]],
                              [[9.0, 2.0, 1.0, -5.0], [1.0, 0.0]], [[False, True, True, False], [True, False]])
    assert rows == [{"prompt": "p1", "chosen": "fine.", "rejected": "ok.", "score_chosen": 2.0, "score_rejected": 1.0}]
    # p2 has one finished sample: its pair with itself is dropped, never one with the unfinished "b"
    assert stats["pairs_kept"] == 1 and stats["samples_unfinished_dropped"] == 3
    assert stats["samples_ended"] == pytest.approx(3 / 6)


def test_missing_eos_penalize_lowers_unfinished_scores_and_keep_marks_the_row():
    texts, scores, ended = [["cut", "done.", "bad."]], [[3.0, 2.0, 0.0]], [[False, True, True]]
    rows, _ = select_rows(select_config(missing_eos_penalty=2.0), ["p"], texts, scores, ended)
    assert (rows[0]["chosen"], rows[0]["rejected"], rows[0]["score_chosen"]) == ("done.", "bad.", 2.0)
    rows, _ = select_rows(select_config(missing_eos="keep"), ["p"], texts, scores, ended)
    assert rows == [{"prompt": "p", "chosen": "cut", "rejected": "bad.", "score_chosen": 3.0, "score_rejected": 0.0,
                     "chosen_ended": False, "rejected_ended": True}]


def test_missing_eos_settings_that_contradict_each_other_are_refused():
    with pytest.raises(ConfigError, match="penalize needs a missing_eos_penalty"):
        select_config(missing_eos="penalize").validate(require_model=False)
    with pytest.raises(ConfigError, match="applies with missing_eos: penalize, not drop"):
        select_config(missing_eos="drop", missing_eos_penalty=1.0).validate(require_model=False)
    with pytest.raises(ConfigError, match="KTO examples"):
        select_config(missing_eos="keep", loss_type="kto").validate(require_model=False)


class CountingJudge:
    """A pairwise judge (like an LLM judge): prefers the longer text, ties half."""

    def compare(self, prompts, first, second):
        return [1.0 if len(a) > len(b) else 0.5 if len(a) == len(b) else 0.0 for a, b in zip(first, second)]


def test_a_pairwise_judge_scores_each_sample_by_its_share_of_wins():
    assert round_robin(CountingJudge(), "p", ["aaa", "a", "aa", "bb"]) == pytest.approx([1.0, 0.0, 0.5, 0.5])


# ---------------------------------------------------------------------- whole runs


def test_iterate_raises_the_oracle_reward_round_over_round(toy_run, one_thread):
    # the oracle is estimated from 64 samples a round: seed 1 is one whose first round's gain is not lost in that noise
    result = train_iterate(toy_config(toy_run, "learns", seed=1), judge=calm_count, oracle=calm_minus_loud)
    oracle = [r["eval"]["oracle_reward"] for r in result.rounds]
    kl = [r["eval"]["kl"] for r in result.rounds]
    assert [r["round"] for r in result.rounds] == [0, 1, 2, 3]
    assert all(b > a for a, b in zip(oracle, oracle[1:])), oracle   # the oracle never saw training
    assert oracle[-1] > oracle[0] + 0.5, oracle
    assert kl[0] == 0.0 and all(b > a for a, b in zip(kl, kl[1:])), kl
    assert result.rounds[-1]["eval"]["win_rate"] > 0.6
    assert all(r["pairs_kept"] >= 30 for r in result.rounds[1:])
    for r in range(1, 4):
        round_dir = result.run_dir / "rounds" / str(r)
        for name in ("samples.jsonl", "judged.json", "pairs.jsonl", "select.json", "eval.json", "round.json"):
            assert (round_dir / name).is_file(), name
        assert (round_dir / "train" / "model" / "model.safetensors").is_file()
    assert result.model_dir == result.run_dir / "rounds" / "3" / "train" / "model"
    page = result.report.read_text()
    assert "Rounds (held-out prompts" in page and page.count("data:image/png;base64") >= 4
    assert "Generations per round" in page
    # the report speaks the console's names, says what ran, and has the monitors' own section
    assert "independent score" in page and "oracle" not in page and "init on train.jsonl" in page
    assert "Reward-hacking monitors" in page
    assert "win_rate" not in result.rounds[0]["eval"]           # no invented round-0 win rate
    logged = [json.loads(line) for line in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [m["round"] for m in logged] == [0, 1, 2, 3] and all("monitor/ended" in m for m in logged)
    # a finished run is not redone: resuming it reads every round back
    again = train_iterate(toy_config(toy_run, "learns", seed=1, resume="latest"), judge=calm_count,
                          oracle=calm_minus_loud)
    assert again.rounds == result.rounds


def test_a_round_under_the_default_trains_on_finished_samples_only(toy_run, one_thread):
    result = train_iterate(toy_config(toy_run, "finished", rounds=1, max_steps=2, missing_eos="auto",
                                      max_new_tokens=40, max_length=96, samples_per_prompt=8), judge=calm_count)
    round_dir = result.run_dir / "rounds" / "1"
    samples = [json.loads(line) for line in (round_dir / "samples.jsonl").read_text().splitlines()]
    ended = {(json.dumps(r["prompt"]), t) for r in samples for t, e in zip(r["samples"], r["ended"]) if e}
    cut = {(json.dumps(r["prompt"]), t) for r in samples for t, e in zip(r["samples"], r["ended"]) if not e}
    pairs = [json.loads(line) for line in (round_dir / "pairs.jsonl").read_text().splitlines()]
    assert cut and pairs, (len(cut), len(pairs))   # both kinds were sampled, and pairs were kept
    for pair in pairs:
        key = json.dumps(pair["prompt"])
        assert (key, pair["chosen"]) in ended and (key, pair["rejected"]) in ended
        assert "chosen_ended" not in pair
    selected = json.loads((round_dir / "select.json").read_text())
    assert selected["samples_unfinished_dropped"] == len(cut) and selected["pairs_kept"] == len(pairs)


def test_kto_rounds_against_the_initial_reference(toy_run, one_thread):
    result = train_iterate(toy_config(toy_run, "kto", rounds=2, loss_type="kto", ref="initial", max_steps=6,
                                      missing_eos="penalize", missing_eos_penalty=1.0),
                           judge=calm_count, oracle=calm_minus_loud)
    for round_ in (1, 2):
        round_dir = result.run_dir / "rounds" / str(round_)
        rows = [json.loads(line) for line in (round_dir / "pairs.jsonl").read_text().splitlines()]
        assert [r["label"] for r in rows[:4]] == [True, False, True, False]   # best desirable, worst undesirable
        assert all(a["score"] > b["score"] for a, b in zip(rows[::2], rows[1::2]))
        trained = json.loads((round_dir / "train" / "config.json").read_text())
        assert trained["loss_type"] == "kto" and trained["ref_model_name_or_path"] == str(toy_run / "init")
        assert trained["model_name_or_path"] == str(result.rounds[round_ - 1]["policy"])
    assert result.rounds[2]["eval"]["kl"] > 0.05
    assert result.rounds[2]["eval"]["oracle_reward"] > result.rounds[0]["eval"]["oracle_reward"]


def test_dpo_rounds_take_ld_alpha_and_use_weighting_and_kto_refuses_them(toy_run, one_thread):
    result = train_iterate(toy_config(toy_run, "ld-wpo", rounds=1, max_steps=4, ld_alpha=0.5, use_weighting=True),
                           judge=calm_count)
    train_dir = result.run_dir / "rounds" / "1" / "train"
    trained = json.loads((train_dir / "config.json").read_text())
    assert trained["ld_alpha"] == 0.5 and trained["use_weighting"] is True and trained["precompute_ref"] is True
    cache = json.loads((train_dir / "reference_cache.json").read_text())["train"]
    assert cache["sequences"] > 0 and not cache["reused"]
    steps = [json.loads(line) for line in (train_dir / "metrics.jsonl").read_text().splitlines() if '"loss"' in line]
    assert steps and all(math.isfinite(r["loss"]) for r in steps)
    with pytest.raises(ConfigError, match="KTO does not use them"):
        toy_config(toy_run, "kto-ld", loss_type="kto", ld_alpha=0.5).validate()


def run_outputs(run_dir: Path) -> tuple[list[dict], dict[str, torch.Tensor], list[str]]:
    """What must be equal between two runs: per-round records (paths made relative), weights, eval samples."""
    records = [json.loads(line) for line in (run_dir / "rounds.jsonl").read_text().splitlines()]
    for record in records:
        record["policy"] = os.path.relpath(record["policy"], run_dir) if str(run_dir) in record["policy"] else "init"
    weights = load_file(run_dir / "rounds" / "2" / "train" / "model" / "model.safetensors")
    samples = [(run_dir / "rounds" / str(r) / "eval_samples.jsonl").read_text() for r in range(3)]
    return records, weights, samples


def assert_same_run(a: Path, b: Path) -> None:
    records_a, weights_a, samples_a = run_outputs(a)
    records_b, weights_b, samples_b = run_outputs(b)
    assert records_a == records_b
    assert samples_a == samples_b
    assert weights_a.keys() == weights_b.keys()
    for name in weights_a:
        assert torch.equal(weights_a[name], weights_b[name]), name


@pytest.fixture(scope="module")
def uninterrupted(toy_run):
    torch.set_num_threads(1)
    return train_iterate(toy_config(toy_run, "whole", rounds=2), judge=calm_count, oracle=calm_minus_loud).run_dir


class Killed(Exception):
    pass


@pytest.mark.parametrize("where", ["judge", "train", "evaluate"])
def test_a_run_killed_mid_round_resumes_to_the_same_result(toy_run, uninterrupted, monkeypatch, where):
    calls = {"judge": 0}

    def judge(prompts, responses):
        calls["judge"] += len(responses) == 32 * 8   # a round's judging (evaluation scores 16 x 4 samples)
        if where == "judge" and calls["judge"] == 2:
            raise Killed
        return calm_count(prompts, responses)

    original_train, original_evaluate = iterate_module.Rounds.train, iterate_module.Rounds.evaluate

    def train(self, round_dir, round_, *args):
        if where == "train" and round_ == 2:
            raise Killed
        return original_train(self, round_dir, round_, *args)

    def evaluate(self, policy_dir, reference):
        if where == "evaluate" and "rounds/2" in str(policy_dir):
            raise Killed
        return original_evaluate(self, policy_dir, reference)

    monkeypatch.setattr(iterate_module.Rounds, "train", train)
    monkeypatch.setattr(iterate_module.Rounds, "evaluate", evaluate)
    with pytest.raises(Killed):
        train_iterate(toy_config(toy_run, f"killed-{where}", rounds=2), judge=judge, oracle=calm_minus_loud)
    run_dir = toy_run / f"killed-{where}"
    second = run_dir / "rounds" / "2"
    second = run_dir / "rounds" / "2"
    assert (run_dir / "rounds" / "1" / "round.json").is_file() and not (second / "round.json").exists()
    finished = {name: (second / name).stat().st_mtime_ns
                for name in ("samples.jsonl", "judged.json", "select.json") if (second / name).exists()}
    monkeypatch.undo()
    with pytest.raises(ConfigError, match="already holds an iterate run"):
        train_iterate(toy_config(toy_run, f"killed-{where}", rounds=2), judge=calm_count, oracle=calm_minus_loud)
    train_iterate(toy_config(toy_run, f"killed-{where}", rounds=2, resume="latest"), judge=calm_count,
                  oracle=calm_minus_loud)
    for name, stamp in finished.items():  # the killed round's finished stages were reused, not redone
        assert (second / name).stat().st_mtime_ns == stamp, name
    assert_same_run(uninterrupted, run_dir)


def test_the_cli_killed_by_a_signal_resumes_to_the_same_result(toy_run, uninterrupted):
    run_dir = toy_run / "signalled"
    settings = toy_settings(toy_run, "signalled", rounds=2)
    args = [sys.executable, "-m", "preftune.cli", "iterate", "--judge", "function:toydata:calm_count", "--oracle",
            "function:toydata:calm_minus_loud"] + [f"--{k}={v}" for k, v in settings.items()]
    paths = [str(TESTS.parent), str(TESTS), os.environ.get("PYTHONPATH", "")]   # the tests' hooks kept
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, paths)), "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    target = run_dir / "rounds" / "2" / "judged.json"
    deadline = time.monotonic() + 240
    while not target.exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)   # somewhere in round 2, after its judging
    process.communicate()
    assert target.exists() and not (run_dir / "rounds.jsonl").exists()
    done = subprocess.run(args + ["--resume"], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert_same_run(uninterrupted, run_dir)


# ---------------------------------------------------------------------- mistakes


def test_mistakes_are_reported_before_any_model_loads(toy_run, capsys):
    base = ["iterate", "--model_name_or_path", str(toy_run / "init"), "--dataset", str(toy_run / "train.jsonl"),
            "--eval_fraction", "0.25", "--output_dir", str(toy_run / "mistakes")]
    assert main(base) == 2
    assert "iterate needs a judge" in capsys.readouterr().err
    assert main(base + ["--annotate_db", "sqlite:///x.db"]) == 2
    assert "--annotate_db needs --project" in capsys.readouterr().err
    assert main(base + ["--judge", "function:toydata:calm_count", "--samples_per_prompt", "1"]) == 2
    assert "samples_per_prompt must be at least 2" in capsys.readouterr().err
    assert main(base + ["--judge", "function:toydata:calm_count", "--loss_type", "kto", "--label_smoothing",
                        "0.1"]) == 2
    assert "KTO does not use it" in capsys.readouterr().err
    assert not (toy_run / "mistakes").exists()


def test_resuming_with_other_settings_is_refused(toy_run, uninterrupted):
    with pytest.raises(ConfigError, match=r"other settings \(beta\)"):
        train_iterate(toy_config(toy_run, "whole", rounds=2, beta=0.5, resume="latest"), judge=calm_count)


def test_the_chat_demo_oracle_penalises_degenerate_reviews():
    from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

    from preftune.demo.chat import review_prompt, review_reward

    vader = SentimentIntensityAnalyzer().polarity_scores
    prompt = review_prompt("wireless headphones")
    good = "These headphones sound wonderful and I love them."
    off_topic = "It sounds wonderful and I love it."
    looping = "great headphones great headphones great headphones great headphones"
    scores = review_reward([prompt] * 4, [good, off_topic, looping, "  "])
    assert scores[0] == pytest.approx(vader(good)["compound"]) and scores[0] > 0.7
    assert scores[1] == pytest.approx(vader(off_topic)["compound"] - 1.0)   # the product is never named
    # 6 trigrams, 2 distinct: 4 of 6 repeat an earlier one
    assert scores[2] == pytest.approx(vader(looping)["compound"] - 2.0 * 4 / 6)
    assert scores[3] == -2.0
    assert review_reward([review_prompt("hiking boots")], ["My new boot fits well."])[0] > 0  # singular counts
    two = "These headphones sound wonderful. I love them."      # the task asks for one sentence
    assert review_reward([prompt], [two])[0] == pytest.approx(vader(two)["compound"] - 1.0)
    # a product named as one word ("smartwatch" for "smart watch") is on topic, another word ending alike is not
    watch = review_prompt("smart watch")
    assert review_reward([watch] * 2, ["This smartwatch is great.", "This smart-watch is great."]) == [
        pytest.approx(vader("This smartwatch is great.")["compound"]),
        pytest.approx(vader("This smart-watch is great.")["compound"])]
    assert review_reward([watch], ["This stopwatch is great."])[0] < 0


def test_the_chat_demo_independent_score_shares_no_lexicon_and_penalises_cut_off_replies():
    from textblob.en.sentiments import PatternAnalyzer

    from preftune.demo.chat import independent_review_score, review_prompt

    polarity = PatternAnalyzer().analyze
    prompt = review_prompt("smart watch")
    replies = ["This smartwatch is great.", "This smartwatch is great and", "It is great.", " "]
    scores = independent_review_score([prompt] * 4, replies)
    assert scores[0] == pytest.approx(polarity(replies[0]).polarity) and scores[0] > 0.5
    assert scores[1] == pytest.approx(polarity(replies[1]).polarity - 1.0)     # does not end a sentence
    assert scores[2] == pytest.approx(polarity(replies[2]).polarity - 1.0)     # off-topic
    assert scores[3] == -2.0
    # a word VADER rates and the pattern lexicon does not know: the two scorers disagree on it
    assert independent_review_score([prompt], ["This smartwatch is a lifesaver."])[0] == pytest.approx(0.0)
