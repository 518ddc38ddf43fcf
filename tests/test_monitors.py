"""Reward-hacking monitors: a judge that rewards length alone sets them off, an honest judge does not."""

import random

import pytest

from preftune.diversity import distinct_n, self_bleu
from preftune.errors import ConfigError
from preftune.monitors import (
    Monitor,
    OnlineMonitor,
    Thresholds,
    crossed,
    measure,
    parse_thresholds,
    repeated_ngrams,
    top_opening,
)

WORDS = ["calm", "quiet", "soft", "warm", "gentle", "steady", "bright", "clear", "kind", "slow", "still", "light",
         "green", "blue", "round", "small", "plain", "fresh", "cool", "fine"]
CAP = 24   # tokens: a reply this long was cut off


def candidates(rng: random.Random, k: int = 8) -> list[tuple[str, bool, int]]:
    """A prompt's k sampled replies: (text, ended, length in tokens); the long ones hit the cap and never ended."""
    out = []
    for _ in range(k):
        length = rng.choice([6, 8, 10, 12, CAP])
        text = " ".join(rng.choice(WORDS) for _ in range(length)) + ("." if length < CAP else "")
        out.append((text, length < CAP, length))
    return out


def best_of(judge, pools) -> list[tuple[str, bool, int]]:
    """What optimising ``judge`` does to the replies: the best of each prompt's candidates."""
    return [max(pool, key=judge) for pool in pools]


def monitor_run(judge) -> tuple[list[dict], list[str]]:
    rng = random.Random(0)
    base_pools = [candidates(rng) for _ in range(64)]
    pools = [candidates(rng) for _ in range(64)]
    baseline = [pool[0] for pool in base_pools]          # the reference model: one plain sample per prompt
    chosen = best_of(judge, pools)

    def numbers(replies):
        texts, ended, lengths = zip(*replies)
        return measure(list(texts), list(ended), list(lengths))

    warnings = []
    monitor = Monitor(Thresholds(), warn=warnings.append)
    alarms = monitor.check(numbers(chosen), numbers(baseline), "round 1")
    monitor.check(numbers(chosen), numbers(baseline), "round 2")   # the same alarms: not printed again
    return alarms, warnings


def test_a_judge_that_rewards_length_alone_sets_off_the_length_and_unfinished_monitors():
    alarms, warnings = monitor_run(lambda reply: reply[2])
    fired = {a["monitor"] for a in alarms}
    assert {"length_ratio", "ended", "ended_drop"} <= fired, fired
    by_name = {a["monitor"]: a for a in alarms}
    assert by_name["length_ratio"]["value"] > 1.5 and by_name["ended"]["value"] < 0.5
    assert len(warnings) == len(alarms)   # each crossed threshold printed once over two checks
    assert any("replies grew from" in w for w in warnings)


def test_an_honest_judge_that_prefers_finished_replies_sets_off_nothing():
    alarms, warnings = monitor_run(lambda reply: (reply[1], reply[0].count("calm")))
    assert alarms == [] and warnings == []


def test_repetition_openings_kl_and_the_judge_gap_are_measured():
    assert repeated_ngrams("great pan great pan great pan") == pytest.approx(2 / 4)
    assert repeated_ngrams("two words") == 0.0
    assert top_opening(["I love it", "I love this", "Nice one", "i LOVE it!"]) == ("i love it", 0.5)
    current = measure(["I love it a lot"] * 4, [True] * 4, [5] * 4, kl=[2.0, 3.0, 1.0, 4.0], judge=[3.0, 3.0, 3.0, 3.0],
                      independent=[0.1, 0.1, 0.1, 0.1])
    assert current["kl_per_token"] == pytest.approx(10.0 / 20)
    base = {"judge_mean": 1.0, "judge_sd": 1.0, "independent_mean": 0.0, "independent_sd": 1.0}
    gap = {a["monitor"]: a["value"] for a in crossed(current, base, Thresholds())}
    assert gap["judge_gap"] == pytest.approx(2.0 - 0.1)      # judge rose 2 sd, the independent score 0.1 sd
    assert gap["top_opening"] == 1.0


def test_thresholds_parse_from_name_value_pairs():
    assert parse_thresholds(["max_length_ratio=2", "min_ended=0.3"]).max_length_ratio == 2.0
    with pytest.raises(ConfigError, match="must look like NAME=NUMBER"):
        parse_thresholds(["length=2"])
    with pytest.raises(ConfigError, match="is not a number"):
        parse_thresholds(["min_ended=half"])


def test_the_report_lists_each_crossed_monitor_once_with_the_first_step(tmp_path):
    import json

    from preftune.evaluate.report import write_report

    watched, quiet = tmp_path / "watched", tmp_path / "quiet"
    for path, alarms in ((watched, [None, "length_ratio", "length_ratio"]), (quiet, [None, None, None])):
        path.mkdir()
        lines = [{"step": step + 1, "loss": 0.5, "monitor/mean_length": 10.0 + 10 * step,
                  **({f"monitor/alarm/{alarm}": 1.0} if alarm else {})} for step, alarm in enumerate(alarms)]
        (path / "metrics.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    page = write_report([watched], tmp_path / "a.html").read_text()
    assert "Reward-hacking monitors" in page and page.count("length_ratio") == 1
    assert "<td>2</td><td>length_ratio</td><td>20</td>" in page         # first crossed at step 2, mean length 20
    assert "No monitor crossed its threshold" in write_report([quiet], tmp_path / "b.html").read_text()


def test_an_online_trainer_s_monitor_sees_its_replies_collapse_into_one():
    rng = random.Random(1)
    varied = [t for t, _, _ in candidates(rng, 32)]
    warnings = []
    monitor = OnlineMonitor(Thresholds(), warn=warnings.append)
    first = monitor.observe(varied, [True] * 32, [10] * 32)
    assert first["monitor/distinct_2"] == pytest.approx(distinct_n(varied, 2))
    assert first["monitor/self_bleu"] == pytest.approx(self_bleu(varied))
    assert not any(k.startswith("monitor/alarm/") for k in first)
    same = monitor.observe(["calm quiet soft warm gentle ."] * 32, [True] * 32, [10] * 32)
    assert same["monitor/distinct_2"] == pytest.approx(5 / (32 * 5)) and same["monitor/self_bleu"] == pytest.approx(1.0)
    assert same["monitor/alarm/distinct_2_drop"] == 1.0 and same["monitor/alarm/self_bleu_rise"] == 1.0
    assert sum("distinct-2 fell" in w for w in warnings) == 1 and sum("self-BLEU rose" in w for w in warnings) == 1
