"""One self-contained HTML page for one or more runs: training curves, evaluation tables and, when
several runs were evaluated, the reward-vs-KL frontier (the DPO paper's Figure 2, left).

A run directory may hold ``metrics.jsonl`` (training), ``summary.json`` and ``eval.json``
(``preftune eval`` output); a directory with only ``eval.json`` (a baseline such as the SFT model or
best-of-N) is shown in the evaluation table and on the frontier. Plots are PNGs embedded as base64,
so the page opens anywhere; every piece of text is HTML-escaped.
"""

from __future__ import annotations

import base64
import html
import io
import json
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import PreftuneError

CURVES = [
    ("loss", "training loss"), ("eval/loss", "held-out loss"), ("rewards/margins", "reward margin (chosen - rejected)"),
    ("rewards/accuracies", "preference accuracy"), ("rewards/chosen", "reward of chosen"),
    ("rewards/rejected", "reward of rejected"), ("accuracy", "reward-model accuracy"),
    ("objective/scores", "PPO mean reward"), ("objective/kl", "PPO KL to reference"),
]
EVAL_COLUMNS = ["reward", "kl", "win_rate", "entropy", "distinct_1", "distinct_2", "self_bleu", "mean_length",
                "eos_rate"]


@dataclass
class RunData:
    name: str
    path: Path
    records: list[dict] = field(default_factory=list)
    summary: dict = field(default_factory=dict)
    evaluation: dict = field(default_factory=dict)


def read_run(path: Path, name: str | None = None) -> RunData:
    path = Path(path)
    if not path.is_dir():
        raise PreftuneError(f"{path}: not a run directory")
    run = RunData(name or path.name, path)
    metrics = path / "metrics.jsonl"
    if metrics.is_file():
        for number, line in enumerate(metrics.read_text().splitlines(), start=1):
            if line.strip():
                try:
                    run.records.append(json.loads(line))
                except json.JSONDecodeError:
                    raise PreftuneError(f"{metrics}: row {number}: not valid JSON") from None
    for attr, file in (("summary", "summary.json"), ("evaluation", "eval.json")):
        if (path / file).is_file():
            try:
                setattr(run, attr, json.loads((path / file).read_text()))
            except json.JSONDecodeError:
                raise PreftuneError(f"{path / file}: not valid JSON") from None
    if not (run.records or run.summary or run.evaluation):
        raise PreftuneError(f"{path}: holds neither metrics.jsonl, summary.json nor eval.json")
    return run


def _figure_to_base64(fig) -> str:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    import matplotlib.pyplot as plt

    plt.close(fig)
    return base64.b64encode(buffer.getvalue()).decode()


def curve_plots(runs: list[RunData]) -> list[tuple[str, str]]:
    """(title, base64 PNG) for each metric that at least one run logged."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plots = []
    for key, title in CURVES:
        series = [(run.name, [(r["step"], r[key]) for r in run.records if key in r]) for run in runs]
        series = [(name, points) for name, points in series if points]
        if not series:
            continue
        fig, ax = plt.subplots(figsize=(5.2, 3.3))
        for name, points in series:
            steps, values = zip(*points)
            ax.plot(steps, values, marker="o" if len(points) < 20 else None, markersize=3, label=name)
        ax.set_xlabel("step")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        if len(series) > 1:
            ax.legend(fontsize=7)
        plots.append((title, _figure_to_base64(fig)))
    return plots


def frontier_plot(runs: list[RunData]) -> str | None:
    """Mean reward against KL(π ‖ π_ref) for every evaluated run that has both."""
    points = [(run.name, run.evaluation["kl"], run.evaluation["reward"]) for run in runs
              if "kl" in run.evaluation and "reward" in run.evaluation]
    if not points:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    families: dict[str, list] = {}
    for name, kl, reward in points:
        families.setdefault(name.split("-")[0], []).append((kl, reward, name))
    for family, items in sorted(families.items()):
        items.sort()
        ax.plot([i[0] for i in items], [i[1] for i in items], marker="o", label=family)
        for index, (kl, reward, name) in enumerate(items):
            ax.annotate(name, (kl, reward), fontsize=7, xytext=(4, 4 if index % 2 == 0 else -11),
                        textcoords="offset points")
    ax.set_xlabel("KL(π ‖ π_ref), nats per sequence")
    ax.set_ylabel("mean reward")
    ax.set_title("reward vs KL frontier")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _figure_to_base64(fig)


def _cell(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return html.escape(str(value))


def _table(headers: list[str], rows: list[list]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{_cell(v)}</td>" for v in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def final_metrics(run: RunData) -> dict:
    last: dict = {}
    for record in run.records:
        last.update({k: v for k, v in record.items() if not k.startswith("eval/")})
    return last


def render_html(runs: list[RunData], title: str = "preftune report", notes: list[str] = ()) -> str:
    parts = [f"<h1>{html.escape(title)}</h1>"]
    parts += [f"<p class='note'>{html.escape(n)}</p>" for n in notes]
    evaluated = [run for run in runs if run.evaluation]
    if evaluated:
        columns = [c for c in EVAL_COLUMNS if any(c in run.evaluation for run in evaluated)]
        parts.append("<h2>Evaluation</h2>")
        parts.append(_table(["run"] + columns,
                            [[run.name] + [run.evaluation.get(c, "") for c in columns] for run in evaluated]))
        frontier = frontier_plot(runs)
        if frontier:
            parts.append("<h2>Reward vs KL</h2>")
            parts.append(f"<img alt='reward vs KL frontier' src='data:image/png;base64,{frontier}'>")
    trained = [run for run in runs if run.records]
    if trained:
        keys = ["step", "loss", "rewards/accuracies", "rewards/margins", "eval/loss", "eval/rewards/accuracies",
                "objective/scores", "objective/kl", "accuracy"]
        rows = []
        for run in trained:
            last = final_metrics(run)
            last.update(run.summary.get("eval", {}) or {})
            rows.append([run.name] + [last.get(k, "") for k in keys])
        used = [i for i, _ in enumerate(keys) if any(row[i + 1] != "" for row in rows)]
        parts.append("<h2>Training</h2>")
        parts.append(_table(["run"] + [keys[i] for i in used], [[row[0]] + [row[i + 1] for i in used] for row in rows]))
        parts.append("<div class='plots'>")
        for plot_title, image in curve_plots(trained):
            parts.append(f"<figure><img alt='{html.escape(plot_title)}' src='data:image/png;base64,{image}'>"
                         f"<figcaption>{html.escape(plot_title)}</figcaption></figure>")
        parts.append("</div>")
    style = ("body{font-family:system-ui,sans-serif;margin:2em;max-width:1200px}table{border-collapse:collapse;"
             "margin:1em 0}td,th{border:1px solid #ccc;padding:4px 8px;text-align:right}th{background:#f4f4f4}"
             "td:first-child{text-align:left}.plots{display:flex;flex-wrap:wrap;gap:12px}figure{margin:0}"
             "figcaption{font-size:0.8em;color:#555}.note{color:#444}")
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            f"<style>{style}</style></head><body>{''.join(parts)}</body></html>")


def write_report(run_dirs: list[str | Path], output: str | Path, title: str = "preftune report",
                 names: list[str] | None = None, notes: list[str] = ()) -> Path:
    runs = [read_run(Path(d), names[i] if names else None) for i, d in enumerate(run_dirs)]
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(render_html(runs, title, notes))
    return output
