"""The HTML report of an iterate run: a table and curves per round, and sample generations per round.

Built from the run's ``rounds/*/round.json``, ``eval.json`` and ``eval_samples.jsonl`` with the
building blocks of :mod:`preftune.evaluate.report` (tables, embedded PNG figures).
"""

from __future__ import annotations

import html
import json
from pathlib import Path

from ..evaluate.report import figure_to_base64, html_table

COLUMNS = [("reward", "judge score"), ("reward_std", "sd"), ("oracle_reward", "oracle score"),
           ("oracle_reward_std", "sd"), ("win_rate", "win rate vs initial (judge)"),
           ("oracle_win_rate", "win rate vs initial (oracle)"), ("kl", "KL to initial"), ("distinct_2", "distinct-2"),
           ("self_bleu", "self-BLEU"), ("mean_length", "length"), ("eos_rate", "ended")]
CURVES = [("score on held-out prompts", ["reward", "oracle_reward"]), ("win rate vs the initial model",
                                                                        ["win_rate", "oracle_win_rate"]),
          ("KL to the initial model (nats)", ["kl"]), ("diversity", ["distinct_2", "self_bleu"])]
SHOWN_PROMPTS = 3


def round_table(records: list[dict]) -> str:
    used = [(key, title) for key, title in COLUMNS if any(key in r["eval"] for r in records)]
    headers = ["round", "pairs kept", "pairs dropped"] + [title for _, title in used]
    rows = [[r["round"], r.get("pairs_kept", ""), r.get("pairs_dropped", "")] + [r["eval"].get(k, "") for k, _ in used]
            for r in records]
    return html_table(headers, rows)


def round_curves(records: list[dict]) -> list[tuple[str, str]]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plots = []
    series = CURVES + [("pairs kept per round", ["pairs_kept"])]
    for title, keys in series:
        fig, ax = plt.subplots(figsize=(4.6, 3.0))
        drawn = False
        for key in keys:
            points = [(r["round"], r["eval"].get(key, r.get(key))) for r in records]
            points = [(x, y) for x, y in points if isinstance(y, (int, float))]
            if points:
                ax.plot(*zip(*points), marker="o", label=key)
                drawn = True
        if not drawn:
            plt.close(fig)
            continue
        ax.set_xlabel("round")
        ax.set_title(title)
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
        parts.append(html_table(["round", "score", "oracle", "response"],
                            [[r, s.get("score", ""), s.get("oracle_score", ""), s["response"]] for r, s in rows]))
    return "".join(parts)


def write_iterate_report(run_dir: Path, records: list[dict], output: Path, title: str = "preftune iterate",
                         notes: list[str] = ()) -> Path:
    parts = [f"<h1>{html.escape(title)}</h1>"] + [f"<p class='note'>{html.escape(n)}</p>" for n in notes]
    parts += ["<h2>Rounds (held-out prompts; round 0 is the initial model)</h2>", round_table(records),
              "<div class='plots'>"]
    parts += [f"<figure><img alt='{html.escape(t)}' src='data:image/png;base64,{image}'>"
              f"<figcaption>{html.escape(t)}</figcaption></figure>" for t, image in round_curves(records)]
    parts += ["</div>", "<h2>Generations per round</h2>", sample_section(run_dir, records)]
    style = ("body{font-family:system-ui,sans-serif;margin:2em;max-width:1200px}table{border-collapse:collapse;"
             "margin:1em 0}td,th{border:1px solid #ccc;padding:4px 8px;text-align:right}th{background:#f4f4f4}"
             "td:last-child{text-align:left}.plots{display:flex;flex-wrap:wrap;gap:12px}figure{margin:0}"
             "figcaption{font-size:0.8em;color:#555}.note{color:#444}")
    page = (f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            f"<style>{style}</style></head><body>{''.join(parts)}</body></html>")
    output.write_text(page, encoding="utf-8")
    return output
