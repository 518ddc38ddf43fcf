"""`preftune report` on real runs: a DPO run, a reward-model run and an evaluation, on the tiny model."""

import json
from html.parser import HTMLParser

import pytest

from preftune.cli import main
from preftune.evaluate.report import colours, curve_figures, read_run
from test_cli import write_jsonl
from toydata import make_toy_preferences

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_model_dir):
    root = tmp_path_factory.mktemp("report")
    data = write_jsonl(root / "pairs.jsonl", make_toy_preferences(16))
    common = ["--model_name_or_path", str(tiny_model_dir), "--dataset", str(data), "--per_device_batch_size", "4",
              "--max_steps", "3", "--max_length", "64", "--logging_steps", "1"]
    assert main(["dpo", *common, "--beta", "0.2", "--learning_rate", "1e-3", "--output_dir", str(root / "dpo")]) == 0
    assert main(["reward", *common, "--learning_rate", "1e-3", "--output_dir", str(root / "rm")]) == 0
    prompts = root / "prompts.jsonl"
    write_jsonl(prompts, [{"prompt": "Describe the river in a few words:"}, {"prompt": "Describe a garden:"}])
    assert main(["eval", "--model", str(root / "dpo" / "model"), "--prompts", str(prompts), "--ref_model",
                 str(tiny_model_dir), "--max_new_tokens", "6", "--output_dir", str(root / "dpo-eval")]) == 0
    assert main(["report", str(root / "dpo"), str(root / "rm"), str(root / "dpo-eval"), "--output",
                 str(root / "report.html")]) == 0
    return root


class Tables(HTMLParser):
    """The text of every table cell, by table."""

    def __init__(self):
        super().__init__()
        self.tables, self.cell = [], None

    def handle_starttag(self, tag, attrs):
        if tag == "table":
            self.tables.append([])
        elif tag == "tr":
            self.tables[-1].append([])
        elif tag in ("td", "th"):
            self.cell = ""

    def handle_endtag(self, tag):
        if tag in ("td", "th"):
            self.tables[-1][-1].append(self.cell)
            self.cell = None

    def handle_data(self, data):
        if self.cell is not None:
            self.cell += data


def page_tables(root):
    parser = Tables()
    parser.feed((root / "report.html").read_text())
    return {table[0][0] + ":" + ",".join(table[0][1:]): table[1:] for table in parser.tables}


def test_settings_table_names_model_beta_learning_rate_and_steps(runs, tiny_model_dir):
    tables = page_tables(runs)
    settings = tables["run:model,loss,β,learning rate,LoRA,batch,steps"]
    assert settings == [["dpo", str(tiny_model_dir), "sigmoid", "0.2", "0.001", "False", "4", "3"],
                        ["rm", str(tiny_model_dir), "bradley_terry", "", "0.001", "False", "4", "3"]]


def test_sample_generations_and_a_non_negative_kl(runs):
    tables = page_tables(runs)
    samples = [json.loads(line) for line in (runs / "dpo-eval" / "samples.jsonl").read_text().splitlines()]
    shown = tables["run:step,prompt,response,score"]
    assert [row[2:4] for row in shown] == [[s["prompt"], s["response"]] for s in samples]
    evaluation = json.loads((runs / "dpo-eval" / "eval.json").read_text())
    assert evaluation["kl"] > 0                        # 3 steps at lr 1e-3 moved the policy; exact KL is > 0
    [[row]] = [rows for header, rows in tables.items() if header.startswith("run:kl,")]
    assert row[0] == "dpo-eval" and float(row[1]) == pytest.approx(evaluation["kl"], rel=1e-3)


def test_reward_model_scores_have_their_own_charts_and_each_run_one_colour(runs):
    loaded = [read_run(runs / name) for name in ("dpo", "rm", "dpo-eval")]
    colour = colours(loaded)
    assert len(set(colour.values())) == 3
    figures = dict(curve_figures([r for r in loaded if r.records], colour))
    implicit = figures["implicit reward of chosen (β·log-ratio)"].axes[0]
    scores = figures["reward-model score of chosen"].axes[0]
    assert [line.get_label() for line in implicit.get_lines()] == ["dpo"]      # never on one axis together
    assert [line.get_label() for line in scores.get_lines()] == ["rm"]
    rm_chosen = [r["rewards/chosen"] for r in loaded[1].records if "rewards/chosen" in r]
    assert list(scores.get_lines()[0].get_ydata()) == rm_chosen
    for title, fig in figures.items():
        ax = fig.axes[0]
        for line in ax.get_lines():                       # one colour per run, in every chart
            assert line.get_color() == colour[line.get_label()], title
        assert all(float(tick).is_integer() for tick in ax.get_xticks()), title   # integer step axes
    loss_lines = {line.get_label() for line in figures["training loss"].axes[0].get_lines()}
    assert loss_lines == {"dpo", "rm"}
