"""The HTML report of an iterate run: a table and curves per round, and sample generations per round.

Built from the run's ``rounds/*/round.json``, ``eval.json`` and ``eval_samples.jsonl`` with the
building blocks of :mod:`preftune.evaluate.report` (tables, embedded PNG figures).
"""

from __future__ import annotations

import html
import json
from pathlib import Path

from ..config.iterate import IterateConfig
from ..evaluate.monitors import monitor_section
from ..evaluate.report import figure_to_base64, html_table

COLUMNS = [("reward", "judge"), ("reward_std", "judge sd"), ("oracle_reward", "independent score"),
           ("oracle_reward_std", "independent sd"), ("win_rate", "win rate vs initial (judge)"),
           ("oracle_win_rate", "win rate vs initial (independent score)"), ("kl", "KL to initial"),
           ("distinct_2", "distinct-2"), ("self_bleu", "self-BLEU"), ("mean_length", "length"),
           ("eos_rate", "replies that end")]
# (title, [(key, label)], the half-width of its 95% interval from the eval metrics)
CURVES = [("score on held-out prompts", [("reward", "judge"), ("oracle_reward", "independent score")]),
          ("win rate vs the initial model", [("win_rate", "judge"), ("oracle_win_rate", "independent score")]),
          ("KL to the initial model (nats per reply)", [("kl", "KL")]),
          ("diversity", [("distinct_2", "distinct-2"), ("self_bleu", "self-BLEU")]),
          ("replies that end (held-out)", [("eos_rate", "share")])]
SHOWN_PROMPTS = 3
Z95 = 1.96


def interval(metrics: dict, key: str) -> float | None:
    """Half-width of the 95% interval of a per-round figure (normal approximation over the held-out replies)."""
    n, value = metrics.get("n"), metrics.get(key)
    if not n or not isinstance(value, (int, float)):
        return None
    if key in ("reward", "oracle_reward") and f"{key}_std" in metrics:
        return Z95 * metrics[f"{key}_std"] / n ** 0.5
    if key in ("win_rate", "oracle_win_rate", "eos_rate") and 0.0 <= value <= 1.0:
        return Z95 * (value * (1.0 - value) / n) ** 0.5
    if key == "kl" and "kl_std_error" in metrics:
        return Z95 * metrics["kl_std_error"]
    return None


def _value(record: dict, key: str):
    return record["eval"].get(key, record.get(key, ""))


def round_table(records: list[dict]) -> str:
    counts = [(k, t) for k, t in (("pairs_kept", "pairs kept"), ("pairs_dropped", "pairs dropped"),
                                   ("samples_ended", "training samples that end"))
              if any(isinstance(r.get(k), (int, float)) for r in records)]
    used = [(key, title) for key, title in COLUMNS if any(key in r["eval"] for r in records)]
    headers = ["round"] + [title for _, title in counts + used]
    rows = [[r["round"]] + [r.get(k, "") for k, _ in counts] + [r["eval"].get(k, "") for k, _ in used]
            for r in records]
    return html_table(headers, rows)


def round_curves(records: list[dict]) -> list[tuple[str, str]]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    plots = []
    for title, keys in CURVES + [("pairs kept per round", [("pairs_kept", "pairs kept")])]:
        fig, ax = plt.subplots(figsize=(4.6, 3.0))
        drawn = False
        for key, label in keys:
            points = [(r["round"], _value(r, key), interval(r["eval"], key)) for r in records]
            points = [(x, y, e or 0.0) for x, y, e in points if isinstance(y, (int, float))]
            if points:
                xs, ys, errors = zip(*points)
                ax.errorbar(xs, ys, yerr=errors if any(errors) else None, marker="o", capsize=3, label=label)
                drawn = True
        if not drawn:
            plt.close(fig)
            continue
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("round")
        ax.set_title(title, fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        plots.append((title, figure_to_base64(fig)))
    return plots


def _text(content) -> str:
    """A message's content as text: a list of parts joined, each image part shown as [image]."""
    if isinstance(content, str):
        return content
    return "".join(p.get("text") or "" if p.get("type") == "text" else "[image]" for p in content)


def sample_section(run_dir: Path, records: list[dict]) -> str:
    """The first held-out prompts' generations, one line per round."""
    by_round = {}
    for record in records:
        path = run_dir / "rounds" / str(record["round"]) / "eval_samples.jsonl"
        if path.is_file():
            by_round[record["round"]] = [json.loads(line) for line in path.read_text().splitlines()[:SHOWN_PROMPTS]]
    parts = []
    for index in range(SHOWN_PROMPTS):
        rows = [(r, samples[index]) for r, samples in sorted(by_round.items()) if index < len(samples)]
        if not rows:
            break
        prompt = rows[0][1]["prompt"]
        shown = prompt if isinstance(prompt, str) else " / ".join(_text(m["content"]) for m in prompt)
        parts.append(f"<h3>{html.escape(shown)}</h3>")
        columns = [(k, t) for k, t in (("score", "judge"), ("oracle_score", "independent score"),
                                       ("ended_with_eos", "ends")) if any(k in s for _, s in rows)]
        parts.append(html_table(["round", *[t for _, t in columns], "response"],
                                [[r, *[s.get(k, "") for k, _ in columns], s["response"]] for r, s in rows]))
    return "".join(parts)


def write_iterate_report(run_dir: Path, records: list[dict], output: Path, title: str = "preftune iterate",
                         notes: list[str] = ()) -> Path:
    parts = [f"<h1>{html.escape(title)}</h1>"] + [f"<p class='note'>{html.escape(n)}</p>" for n in notes]
    parts += ["<h2>Rounds (held-out prompts; round 0 is the initial model)</h2>", round_table(records),
              "<div class='plots'>"]
    parts += [f"<figure><img alt='{html.escape(t)}' src='data:image/png;base64,{image}'>"
              f"<figcaption>{html.escape(t)}</figcaption></figure>" for t, image in round_curves(records)]
    parts += ["</div>", "<h2>Reward-hacking monitors (held-out replies against round 0's)</h2>",
              monitor_section([(f"round {r['round']}", r["eval"]["monitor"], r.get("alarms", []))
                               for r in records if "monitor" in r["eval"]]),
              "<h2>Generations per round</h2>", sample_section(run_dir, records)]
    style = ("body{font-family:system-ui,sans-serif;margin:2em;max-width:1200px}table{border-collapse:collapse;"
             "margin:1em 0}td,th{border:1px solid #ccc;padding:4px 8px;text-align:right}th{background:#f4f4f4}"
             "td:last-child{text-align:left}.plots{display:flex;flex-wrap:wrap;gap:12px}figure{margin:0}"
             "figcaption{font-size:0.8em;color:#555}.note{color:#444}")
    page = (f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            f"<style>{style}</style></head><body>{''.join(parts)}</body></html>")
    output.write_text(page, encoding="utf-8")
    return output


def round_line(record: dict) -> str:
    """A round's held-out figures, named as in the report."""
    m = record["eval"]
    parts = [f"round {record['round']}:"]
    for key, name, form in (("reward", "judge", "+.3f"), ("oracle_reward", "independent score", "+.3f"),
                            ("win_rate", "win rate vs initial (judge)", ".2f"),
                            ("oracle_win_rate", "win rate vs initial (independent score)", ".2f"),
                            ("eos_rate", "replies that end", ".2f"), ("kl", "KL", ".2f")):
        if isinstance(m.get(key), (int, float)):
            parts.append(f"{name} {m[key]:{form}}")
    return "   ".join(parts)


def report_title(cfg: IterateConfig, what: str | None = None) -> str:
    """The report's title: ``what`` ran (default: the model on the prompt file) and the settings that shape a run."""
    model = Path(cfg.model_name_or_path).name or cfg.model_name_or_path
    what = what or f"{model} on {Path(cfg.dataset).name if cfg.dataset else 'prompts'}"
    return (f"preftune iterate: {what} — {cfg.rounds} rounds, {cfg.samples_per_prompt} samples per "
            f"prompt, {cfg.loss_type} β={cfg.beta:g}, lr {cfg.learning_rate:g}, {cfg.max_new_tokens} new tokens, "
            f"missing_eos {cfg.eos_mode()}, seed {cfg.seed}")
