"""`preftune eval` with each judge kind, and `preftune report` on its output."""

import json
import math

import pytest

from preftune.cli import main
from test_evaluate import _JudgeServer


@pytest.fixture(scope="module")
def prompts_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("eval-data") / "prompts.jsonl"
    prompts = ["Describe the river in a few words:", "Describe a garden in a few words:",
               "Describe the city in a few words:", "Describe a small cat in a few words:"]
    path.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in prompts))
    return path


def run_eval(tmp_path, model_dir, prompts_file, *extra):
    out = tmp_path / "eval"
    code = main(["eval", "--model", str(model_dir), "--prompts", str(prompts_file), "--max_new_tokens", "8",
                 "--output_dir", str(out), *extra])
    assert code == 0
    metrics = json.loads((out / "eval.json").read_text())
    samples = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    return metrics, samples


def test_function_judge_with_reference_and_baseline(tiny_model_dir, prompts_file, tmp_path):
    metrics, samples = run_eval(tmp_path, tiny_model_dir, prompts_file,
                                "--judge", "function:preftune.demo.sentiment:sentiment_reward",
                                "--ref_model", str(tiny_model_dir), "--baseline_model", str(tiny_model_dir),
                                "--independent", "function:preftune.demo.chat:independent_review_score")
    assert len(samples) == 4 and all("score" in s for s in samples)
    # the reward-hacking monitors measured the samples, against the baseline model's
    assert metrics["monitor"]["ended"] == pytest.approx(metrics["eos_rate"])
    assert metrics["monitor"]["judge_mean"] == pytest.approx(metrics["reward"])
    assert metrics["monitor"]["kl_per_token"] == pytest.approx(0.0, abs=1e-4)
    assert "independent_mean" in metrics["monitor"] and "independent_mean" in metrics["monitor_baseline"]
    logged = json.loads((tmp_path / "eval" / "metrics.jsonl").read_text())
    assert logged["monitor/ended"] == pytest.approx(metrics["eos_rate"])
    assert {f"monitor/alarm/{a['monitor']}" for a in metrics["alarms"]} == {k for k in logged if "/alarm/" in k}
    assert metrics["reward"] == pytest.approx(sum(s["score"] for s in samples) / 4)
    assert metrics["kl"] == pytest.approx(0.0, abs=1e-4)  # the reference is the model itself
    assert 0.0 <= metrics["win_rate"] <= 1.0
    for key in ("distinct_1", "distinct_2", "self_bleu", "entropy", "mean_length", "eos_rate"):
        assert key in metrics
    assert metrics["entropy"] > 0


def test_reward_model_judge_and_pair_accuracy(tiny_model_dir, prompts_file, tmp_path, tiny_tokenizer):
    from transformers import AutoModelForSequenceClassification

    rm_dir = tmp_path / "rm"
    rm = AutoModelForSequenceClassification.from_pretrained(tiny_model_dir, num_labels=1)
    rm.config.pad_token_id = tiny_tokenizer.pad_token_id
    rm.save_pretrained(rm_dir)
    tiny_tokenizer.save_pretrained(rm_dir)
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps({"prompt": "Describe it:", "chosen": " calm kind",
                                         "rejected": " loud rude"}) + "\n"
                             for _ in range(3)))
    metrics, _ = run_eval(tmp_path, tiny_model_dir, prompts_file, "--judge", f"reward_model:{rm_dir}",
                          "--pairs", str(pairs))
    assert math.isfinite(metrics["reward"])
    assert metrics["pair_accuracy"] in (0.0, 0.5, 1.0)  # three identical pairs: all right or all wrong
    assert "mean_margin" in metrics


def test_llm_judge_over_http(tiny_model_dir, prompts_file, tmp_path):
    server = _JudgeServer(lambda a, b: "A")  # a judge with pure position bias
    try:
        metrics, _ = run_eval(tmp_path, tiny_model_dir, prompts_file, "--judge", f"llm:{server.url}",
                              "--baseline_model", str(tiny_model_dir))
    finally:
        server.close()
    assert metrics["win_rate"] == 0.5  # asking both orders cancels the bias exactly
    assert len(server.requests) == 8  # 4 prompts x 2 orders


def test_report_cli_on_eval_output(tiny_model_dir, prompts_file, tmp_path):
    run_eval(tmp_path, tiny_model_dir, prompts_file, "--judge", "function:preftune.demo.sentiment:sentiment_reward",
             "--ref_model", str(tiny_model_dir))
    assert main(["report", str(tmp_path / "eval"), "--output", str(tmp_path / "r.html")]) == 0
    page = (tmp_path / "r.html").read_text()
    assert "reward vs KL frontier" in page


CHAT_PAIR = {"prompt": [{"role": "user", "content": "Describe it:"}],
             "chosen": [{"role": "assistant", "content": "calm kind"}],
             "rejected": [{"role": "assistant", "content": "loud"}]}


def test_conversational_pairs_with_a_reward_model_judge(tiny_model_dir, prompts_file, tmp_path, tiny_tokenizer):
    from transformers import AutoModelForSequenceClassification

    from preftune.scoring.reward_model import RewardModelScorer

    rm_dir = tmp_path / "rm"
    rm = AutoModelForSequenceClassification.from_pretrained(tiny_model_dir, num_labels=1)
    rm.config.pad_token_id = tiny_tokenizer.pad_token_id
    rm.save_pretrained(rm_dir)
    tiny_tokenizer.save_pretrained(rm_dir)
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text(json.dumps(CHAT_PAIR) + "\n")
    metrics, _ = run_eval(tmp_path, tiny_model_dir, prompts_file, "--judge", f"reward_model:{rm_dir}",
                          "--pairs", str(pairs))
    judge = RewardModelScorer(rm_dir)    # the pair scored as a chat prompt and the assistant's text
    chosen, rejected = judge.score([CHAT_PAIR["prompt"]] * 2, ["calm kind", "loud"])
    assert metrics["mean_margin"] == pytest.approx(chosen - rejected, abs=1e-5) and chosen != rejected
    assert metrics["pair_accuracy"] == (1.0 if chosen > rejected else 0.0)


def test_a_function_judge_gets_chat_prompts_as_messages_and_responses_as_text(tiny_model_dir, tmp_path):
    seen = tmp_path / "seen.jsonl"
    (tmp_path / "judge.py").write_text(
        "import json\n"
        "def judge(prompts, responses):\n"
        f"    with open({str(seen)!r}, 'a') as f:\n"
        "        f.write(json.dumps([prompts, responses]) + '\\n')\n"
        "    return [float(len(r)) for r in responses]\n")
    prompts = tmp_path / "chat-prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": CHAT_PAIR["prompt"]}) + "\n" for _ in range(2)))
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text(json.dumps(CHAT_PAIR) + "\n")
    metrics, samples = run_eval(tmp_path, tiny_model_dir, prompts, "--judge", f"function:{tmp_path / 'judge.py'}:judge",
                                "--pairs", str(pairs))
    calls = [json.loads(line) for line in seen.read_text().splitlines()]
    assert calls[0] == [[CHAT_PAIR["prompt"]] * 2, [s["response"] for s in samples]]    # the samples
    assert calls[1:] == [[[CHAT_PAIR["prompt"]], ["calm kind"]], [[CHAT_PAIR["prompt"]], ["loud"]]]
    assert metrics["pair_accuracy"] == 1.0 and metrics["mean_margin"] == 5.0   # len("calm kind") - len("loud")


def test_bad_prompt_file_is_a_clear_error(tiny_model_dir, tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "ok"}) + "\n" + json.dumps({"prompt": ""}) + "\n")
    code = main(["eval", "--model", str(tiny_model_dir), "--prompts", str(bad), "--output_dir", str(tmp_path / "o")])
    assert code == 2
    assert "bad.jsonl: row 2: field 'prompt'" in capsys.readouterr().err
