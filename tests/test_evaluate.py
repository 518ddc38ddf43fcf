"""Evaluation: diversity metrics, judges (function, LLM over HTTP with position swapping), reports."""

import json
import math
import threading
from html.parser import HTMLParser
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from preftune.diversity import bleu, distinct_n, self_bleu
from preftune.errors import PreftuneError
from preftune.evaluate.report import write_report
from preftune.scoring import FunctionScorer
from preftune.scoring.judges import make_judge, win_rate
from preftune.scoring.llm import LLMJudge


def test_distinct_n_by_hand():
    texts = ["the cat sat", "the cat ran"]
    assert distinct_n(texts, 1) == pytest.approx(4 / 6)  # the, cat, sat, ran out of 6 unigrams
    assert distinct_n(texts, 2) == pytest.approx(3 / 4)  # (the cat) twice, (cat sat), (cat ran)
    assert distinct_n([], 2) == 0.0


def test_bleu_and_self_bleu():
    sentence = "the acting was really wonderful and moving".split()
    assert bleu(sentence, [sentence]) == pytest.approx(1.0)
    # unigram precision 1/2, higher orders smoothed: (0+1)/(1+1), (0+1)/(0+1)... computed by hand
    hyp, ref = ["a", "b"], [["a", "c"]]
    expected = math.exp((math.log(1 / 2) + math.log(1 / 2) + math.log(1.0) + math.log(1.0)) / 4)
    assert bleu(hyp, ref) == pytest.approx(expected)
    assert self_bleu(["same words here"] * 5) == pytest.approx(1.0)
    assert self_bleu(["alpha beta gamma", "delta epsilon zeta", "eta theta iota"]) == 0.0


def test_function_judge_and_win_rate():
    judge = FunctionScorer("preftune.demo.sentiment:sentiment_reward")
    scores = judge.score(["p", "p"], ["a wonderful, brilliant film", "an awful, boring mess"])
    assert scores[0] > 0.5 > -0.5 > scores[1]
    rate = win_rate(judge, ["p"] * 3, ["great fun", "terrible", "okay"], ["terrible", "great fun", "okay"])
    assert rate == pytest.approx((1 + 0 + 0.5) / 3)


class _JudgeServer:
    """A local OpenAI-compatible endpoint answering deterministically."""

    def __init__(self, rule):
        self.requests = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                outer.requests.append({"path": self.path, "body": body, "auth": self.headers.get("Authorization")})
                content = body["messages"][-1]["content"]
                a = content.split("Response A:\n", 1)[1].split("\n\nResponse B:", 1)[0]
                b = content.split("Response B:\n", 1)[1].split("\n\nWhich", 1)[0]
                answer = rule(a, b)
                payload = json.dumps({"choices": [{"message": {"role": "assistant", "content": answer}}]}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()


def test_llm_judge_asks_both_orders_and_cancels_position_bias(monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "secret-key")
    fair = _JudgeServer(lambda a, b: "A" if "good" in a else "B" if "good" in b else "A")
    try:
        judge = make_judge(f"llm:{fair.url}", judge_model="tiny-judge")
        verdicts = judge.compare(["q1", "q2", "q3"], ["good answer", "bad answer", "bad answer"],
                                 ["bad answer", "good answer", "also bad"])
        # q3: neither is good, the server always says A: one vote each way -> 0.5
        assert verdicts == [1.0, 0.0, 0.5]
        assert len(fair.requests) == 6
        asked = [(r["body"]["messages"][0]["content"].split("Response A:\n")[1].split("\n")[0]) for r in fair.requests]
        assert asked.count("good answer") == 2 and asked.count("bad answer") == 3  # both orders were asked
        assert all(r["path"] == "/v1/chat/completions" and r["body"]["model"] == "tiny-judge" for r in fair.requests)
        assert all(r["auth"] == "Bearer secret-key" for r in fair.requests)
    finally:
        fair.close()
    biased = _JudgeServer(lambda a, b: "A")  # always prefers the first position
    try:
        judge = LLMJudge(biased.url)
        assert judge.compare(["q"] * 4, ["x", "y", "z", "w"], ["1", "2", "3", "4"]) == [0.5] * 4
        assert win_rate(judge, ["q"] * 2, ["x", "y"], ["1", "2"]) == 0.5
    finally:
        biased.close()


def test_llm_judge_unreachable_is_a_clear_error():
    judge = LLMJudge("http://127.0.0.1:9/v1", retries=0, timeout=2)
    with pytest.raises(PreftuneError, match="could not be reached"):
        judge.compare(["q"], ["a"], ["b"])


class _Images(HTMLParser):
    def __init__(self):
        super().__init__()
        self.images, self.text = [], []

    def handle_starttag(self, tag, attrs):
        if tag == "img":
            self.images.append(dict(attrs))

    def handle_data(self, data):
        self.text.append(data)


def _fake_run(path, losses, evaluation=None):
    path.mkdir(parents=True)
    lines = [{"step": i + 1, "loss": loss, "rewards/accuracies": 0.5 + 0.1 * i, "rewards/margins": 0.2 * i}
             for i, loss in enumerate(losses)]
    (path / "metrics.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    if evaluation:
        (path / "eval.json").write_text(json.dumps(evaluation))
    return path


def test_report_single_run(tmp_path):
    run = _fake_run(tmp_path / "dpo-b0.1", [0.69, 0.61, 0.52])
    html_file = write_report([run], tmp_path / "one.html")
    parser = _Images()
    parser.feed(html_file.read_text())
    alts = [img["alt"] for img in parser.images]
    assert "training loss" in alts and "preference accuracy" in alts
    assert all(img["src"].startswith("data:image/png;base64,") and len(img["src"]) > 1000 for img in parser.images)
    assert "0.52" in "".join(parser.text)


def test_report_several_runs_has_frontier_and_escapes_text(tmp_path):
    runs = [
        _fake_run(tmp_path / "dpo-b0.1", [0.69, 0.5], {"reward": 0.61, "kl": 3.2, "distinct_1": 0.4}),
        _fake_run(tmp_path / "dpo-b0.5", [0.69, 0.6], {"reward": 0.42, "kl": 1.1, "distinct_1": 0.5}),
        _fake_run(tmp_path / "<script>alert(1)", [0.69], {"reward": 0.1, "kl": 0.0}),
    ]
    sft = tmp_path / "sft"
    sft.mkdir()
    (sft / "eval.json").write_text(json.dumps({"reward": 0.05, "kl": 0.0}))
    page = write_report(runs + [sft], tmp_path / "many.html").read_text()
    parser = _Images()
    parser.feed(page)
    assert "reward vs KL frontier" in [img["alt"] for img in parser.images]
    text = "".join(parser.text)
    for number in ("0.61", "3.2", "0.42", "1.1", "0.05"):
        assert number in text
    assert "<script>" not in page and "&lt;script&gt;alert(1)" in page


def test_report_rejects_a_directory_without_results(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(PreftuneError, match="neither metrics.jsonl"):
        write_report([tmp_path / "empty"], tmp_path / "x.html")


def test_self_bleu_equals_bleu_of_each_text_against_all_the_others():
    import random

    rng = random.Random(3)
    words = ["a", "b", "c", "d", "e"]                     # few words: many shared and repeated n-grams
    texts = [" ".join(rng.choice(words) for _ in range(rng.randint(0, 9))) for _ in range(30)]
    texts += [texts[4], texts[7]]                         # exact duplicates: a gram's largest count held twice
    tokens = [t.split() for t in texts]
    plain = sum(bleu(tokens[i], tokens[:i] + tokens[i + 1:]) for i in range(len(tokens))) / len(tokens)
    assert plain > 0.1
    assert self_bleu(texts) == pytest.approx(plain, rel=1e-12)
