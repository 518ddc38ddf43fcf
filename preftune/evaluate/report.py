"""One self-contained HTML page for one or more runs: their settings, training curves, evaluation
tables, sample generations and, when several runs were evaluated, the reward-vs-KL frontier (the DPO
paper's Figure 2, left).

A run directory may hold ``metrics.jsonl`` (training), ``config.json``, ``summary.json``,
``eval.json`` (``preftune eval`` output) and ``samples.jsonl`` (generations of an online run or of
``preftune eval``); a directory with only ``eval.json`` (a baseline such as the SFT model or
best-of-N) is shown in the evaluation table and on the frontier. Each run keeps one colour in every
chart; step axes are integers. A reward model's scores (``preftune reward`` logs them as
``rewards/chosen``) get their own charts, never an axis shared with DPO's β-scaled implicit rewards.
Plots are PNGs embedded as base64, so the page opens anywhere; every piece of text is HTML-escaped.
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
    ("loss", "training loss"), ("eval/loss", "held-out loss"),
    ("rewards/margins", "implicit reward margin β·Δlog-ratio (chosen - rejected)"),
    ("rewards/accuracies", "preference accuracy"), ("rewards/chosen", "implicit reward of chosen (β·log-ratio)"),
    ("rewards/rejected", "implicit reward of rejected (β·log-ratio)"), ("accuracy", "reward-model accuracy"),
    ("rm/chosen", "reward-model score of chosen"), ("rm/rejected", "reward-model score of rejected"),
    ("margin", "reward-model margin (chosen - rejected)"),
    ("objective/scores", "PPO mean reward"), ("objective/kl", "PPO KL to reference"),
]
REWARD_MODEL_LOSSES = ("bradley_terry", "ranking", "soft_label")
SETTINGS = [("model", "model_name_or_path"), ("loss", "loss_type"), ("β", "beta"), ("learning rate", "learning_rate"),
            ("LoRA", "lora"), ("batch", "per_device_batch_size")]
SAMPLES_SHOWN = 3
EVAL_COLUMNS = ["reward", "kl", "win_rate", "entropy", "distinct_1", "distinct_2", "self_bleu", "mean_length",
                "eos_rate"]


@dataclass
class RunData:
    name: str
    path: Path
    records: list[dict] = field(default_factory=list)
    summary: dict = field(default_factory=dict)
    evaluation: dict = field(default_factory=dict)
    config: dict = field(default_factory=dict)
    samples: list[dict] = field(default_factory=list)

    @property
    def is_reward_model(self) -> bool:
        """A ``preftune reward`` run: its ``rewards/*`` are the model's scores, not β-scaled log-ratios."""
        return self.config.get("loss_type") in REWARD_MODEL_LOSSES

    def curve_key(self, key: str) -> str:
        return key.replace("rewards/", "rm/") if self.is_reward_model and key.startswith("rewards/") else key


def read_run(path: Path, name: str | None = None) -> RunData:
    path = Path(path)
    if not path.is_dir():
        raise PreftuneError(f"{path}: not a run directory")
    run = RunData(name or path.name, path)
    run.records = _json_lines(path / "metrics.jsonl")
    run.samples = _json_lines(path / "samples.jsonl")
    for attr, file in (("summary", "summary.json"), ("evaluation", "eval.json"), ("config", "config.json")):
        if (path / file).is_file():
            try:
                setattr(run, attr, json.loads((path / file).read_text()))
            except json.JSONDecodeError:
                raise PreftuneError(f"{path / file}: not valid JSON") from None
    if not (run.records or run.summary or run.evaluation):
        raise PreftuneError(f"{path}: holds neither metrics.jsonl, summary.json nor eval.json")
    return run


def _json_lines(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    rows = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                raise PreftuneError(f"{path}: row {number}: not valid JSON") from None
    return rows


def figure_to_base64(fig) -> str:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    import matplotlib.pyplot as plt

    plt.close(fig)
    return base64.b64encode(buffer.getvalue()).decode()


def colours(runs: list[RunData]) -> dict[str, str]:
    """One colour per run, the same in every chart."""
    return {run.name: f"C{index % 10}" for index, run in enumerate(runs)}


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def curve_plots(runs: list[RunData], colour: dict[str, str]) -> list[tuple[str, str]]:
    """(title, base64 PNG) for each metric that at least one run logged."""
    return [(title, figure_to_base64(fig)) for title, fig in curve_figures(runs, colour)]


def curve_figures(runs: list[RunData], colour: dict[str, str]) -> list[tuple[str, object]]:
    """(title, matplotlib figure) for each metric that at least one run logged."""
    from matplotlib.ticker import MaxNLocator

    plt = _pyplot()
    plots = []
    for key, title in CURVES:
        series = [(run.name, [(r["step"], r[m]) for r in run.records for m in r if run.curve_key(m) == key])
                  for run in runs]
        series = [(name, points) for name, points in series if points]
        if not series:
            continue
        fig, ax = plt.subplots(figsize=(5.2, 3.3))
        for name, points in series:
            steps, values = zip(*points)
            ax.plot(steps, values, marker="o" if len(points) < 20 else None, markersize=3, label=name,
                    color=colour[name])
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("step")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        if len(series) > 1:
            ax.legend(fontsize=7)
        plots.append((title, fig))
    return plots


def frontier_plot(runs: list[RunData], colour: dict[str, str]) -> str | None:
    """Mean reward against KL(π ‖ π_ref) for every evaluated run that has both: a grey line through each
    family of runs (names sharing the part before the first '-'), each point in its run's colour."""
    points = [(run.name, run.evaluation["kl"], run.evaluation["reward"]) for run in runs
              if "kl" in run.evaluation and "reward" in run.evaluation]
    if not points:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    families: dict[str, list] = {}
    for name, kl, reward in points:
        families.setdefault(name.split("-")[0], []).append((kl, reward, name))
    for family, items in sorted(families.items()):
        items.sort()
        ax.plot([i[0] for i in items], [i[1] for i in items], color="0.75", zorder=1)
        for index, (kl, reward, name) in enumerate(items):
            ax.scatter([kl], [reward], color=colour[name], label=name, zorder=2)
            ax.annotate(name, (kl, reward), fontsize=7, xytext=(4, 4 if index % 2 == 0 else -11),
                        textcoords="offset points")
    ax.set_xlabel("KL(π ‖ π_ref), nats per sequence")
    ax.set_ylabel("mean reward")
    ax.set_title("reward vs KL frontier")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    return figure_to_base64(fig)


def settings_rows(runs: list[RunData]) -> list[list]:
    """Per run with a config.json: model, loss, β, learning rate, LoRA, batch and the steps it trained."""
    rows = []
    for run in runs:
        if run.config:
            steps = run.summary.get("steps", max((r.get("step", 0) for r in run.records), default=""))
            rows.append([run.name] + [run.config.get(key, "") for _, key in SETTINGS] + [steps])
    return rows


def sample_rows(run: RunData) -> list[list]:
    """The first few generations of a run (``preftune eval`` output or an online run's samples.jsonl)."""
    rows = []
    for row in run.samples[:SAMPLES_SHOWN]:
        response = row.get("response", row.get("completion", ""))
        score = row.get("score", row.get("reward", ""))
        rows.append([run.name, row.get("step", ""), _text(row.get("prompt", "")), _text(response), score])
    return rows


def _text(value) -> str:
    """A prompt or response as one string; a list of chat messages as 'role: content' lines."""
    if isinstance(value, list):
        return "\n".join(f"{m.get('role', '')}: {m.get('content', '')}" if isinstance(m, dict) else str(m)
                         for m in value)
    return str(value)


def _cell(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return html.escape(str(value))


def html_table(headers: list[str], rows: list[list], css_class: str = "") -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{_cell(v)}</td>" for v in row) + "</tr>" for row in rows)
    return f"<table class='{css_class}'><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def final_metrics(run: RunData) -> dict:
    last: dict = {}
    for record in run.records:
        last.update({k: v for k, v in record.items() if not k.startswith("eval/")})
    return last


def run_alarm_section(runs) -> str:
    """HTML for ``preftune report``: per run, each monitor that crossed its threshold and the first step (or the
    evaluation) where it did; empty when no run logged the monitors."""
    rows, watched = [], False
    for run in runs:
        seen: set[str] = set()
        for record in run.records:
            watched = watched or any(k.startswith("monitor/") for k in record)
            for key in sorted(k for k in record if k.startswith("monitor/alarm/")):
                name = key.removeprefix("monitor/alarm/")
                if name not in seen:
                    seen.add(name)
                    rows.append([run.name, record.get("step", record.get("round", "")), name,
                                 record.get(f"monitor/{_measure_of(name)}", "")])
        for alarm in run.evaluation.get("alarms", []) if isinstance(run.evaluation, dict) else []:
            watched = True
            rows.append([run.name, "eval", alarm["monitor"], alarm["value"]])
        watched = watched or "monitor" in (run.evaluation or {})
    if not watched:
        return ""
    body = (html_table(["run", "first at", "monitor", "value"], rows) if rows
            else "<p>No monitor crossed its threshold.</p>")
    return "<h2>Reward-hacking monitors</h2>" + body


def _measure_of(alarm: str) -> str:
    """The logged measure behind an alarm (``length_ratio`` is a ratio of ``mean_length``, ...)."""
    return {"ended_drop": "ended", "length_ratio": "mean_length", "distinct_2_drop": "distinct_2",
            "self_bleu_rise": "self_bleu"}.get(alarm, alarm)


def render_html(runs: list[RunData], title: str = "preftune report", notes: list[str] = ()) -> str:
    parts = [f"<h1>{html.escape(title)}</h1>"]
    parts += [f"<p class='note'>{html.escape(n)}</p>" for n in notes]
    colour = colours(runs)
    settings = settings_rows(runs)
    if settings:
        parts.append("<h2>Settings</h2>")
        parts.append(html_table(["run"] + [label for label, _ in SETTINGS] + ["steps"], settings))
    evaluated = [run for run in runs if run.evaluation]
    if evaluated:
        columns = [c for c in EVAL_COLUMNS if any(c in run.evaluation for run in evaluated)]
        parts.append("<h2>Evaluation</h2>")
        parts.append(html_table(["run"] + columns,
                            [[run.name] + [run.evaluation.get(c, "") for c in columns] for run in evaluated]))
        frontier = frontier_plot(runs, colour)
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
        parts.append(html_table(["run"] + [keys[i] for i in used],
                                [[row[0]] + [row[i + 1] for i in used] for row in rows]))
        parts.append("<div class='plots'>")
        for plot_title, image in curve_plots(trained, colour):
            parts.append(f"<figure><img alt='{html.escape(plot_title)}' src='data:image/png;base64,{image}'>"
                         f"<figcaption>{html.escape(plot_title)}</figcaption></figure>")
        parts.append("</div>")
    parts.append(run_alarm_section(runs))
    samples = [row for run in runs for row in sample_rows(run)]
    if samples:
        parts.append("<h2>Sample generations</h2>")
        parts.append(html_table(["run", "step", "prompt", "response", "score"], samples, "samples"))
    style = ("body{font-family:system-ui,sans-serif;margin:2em;max-width:1200px}table{border-collapse:collapse;"
             "margin:1em 0}td,th{border:1px solid #ccc;padding:4px 8px;text-align:right}th{background:#f4f4f4}"
             "td:first-child{text-align:left}.plots{display:flex;flex-wrap:wrap;gap:12px}figure{margin:0}"
             "figcaption{font-size:0.8em;color:#555}.note{color:#444}"
             ".samples td{white-space:pre-wrap;text-align:left;vertical-align:top}")
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            f"<style>{style}</style></head><body>{''.join(parts)}</body></html>")


def write_report(run_dirs: list[str | Path], output: str | Path, title: str = "preftune report",
                 names: list[str] | None = None, notes: list[str] = ()) -> Path:
    runs = [read_run(Path(d), names[i] if names else None) for i, d in enumerate(run_dirs)]
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(render_html(runs, title, notes))
    return output
