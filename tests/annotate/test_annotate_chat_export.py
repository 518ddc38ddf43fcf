"""Candidates sampled under a chat template export as conversations, so DPO trains on the context they came from."""

from sqlalchemy import select

from preftune.annotate import queue
from preftune.annotate.aggregate import export_pairs
from preftune.annotate.db import Database
from preftune.annotate.importer import get_project
from preftune.annotate.members import add_member
from preftune.annotate.models import Annotator
from preftune.annotate.tokens import add_annotator
from preftune.cli import main
from preftune.data import Records, TokenizeSettings, tokenize_preferences
from preftune.generate import encode_prompts

PROMPT = "Describe the river in a few words:"


def import_and_export(tmp_path, model_dir, *flags) -> tuple[list[dict], list[str]]:
    """Sample two candidates for one prompt, let one annotator prefer the first: the export, the candidates."""
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(f'{{"prompt": "{PROMPT}"}}\n')
    url = f"sqlite:///{tmp_path / 'a.db'}"
    assert main(["annotate", "import", str(prompts), "--db", url, "--project", "p", "--model", str(model_dir),
                 "--num_candidates", "2", "--max_new_tokens", "6", "--temperature", "2.0", "--seed", "0", *flags]) == 0
    db = Database(url)
    with db.write() as session:
        add_annotator(session, "ana")
        add_member(session, "p", "ana")
    with db.read() as session:
        project = get_project(session, "p")
        ana = session.scalar(select(Annotator.id).where(Annotator.name == "ana"))
    served = queue.next_item(db, project, ana)
    choice = "AB"[served.assignment.display_order.index(0)]        # the first candidate, wherever it is shown
    queue.submit(db, project, ana, served.item.id, {"choice": choice}, "", "r1")
    with db.read() as session:
        rows = export_pairs(session, get_project(session, "p"))
    db.dispose()
    return rows, served.item.candidates


def test_chat_sampled_candidates_export_as_a_conversation(tmp_path, tiny_model_dir, tiny_tokenizer):
    (row,), candidates = import_and_export(tmp_path, tiny_model_dir)    # the toy model has a chat template
    assert row["prompt"] == [{"role": "user", "content": PROMPT}]
    assert row["chosen"] == [{"role": "assistant", "content": candidates[0]}]
    assert row["rejected"] == [{"role": "assistant", "content": candidates[1]}]
    pairs, _ = tokenize_preferences(Records("export", [row], [1]), tiny_tokenizer, TokenizeSettings())
    # DPO reads the prompt ids the candidates were sampled from
    assert pairs[0].prompt_ids == encode_prompts(tiny_tokenizer, [PROMPT], chat=True)[0]


def test_no_chat_samples_and_exports_the_raw_text(tmp_path, tiny_model_dir):
    (row,), candidates = import_and_export(tmp_path, tiny_model_dir, "--no-chat")
    assert (row["prompt"], row["chosen"], row["rejected"]) == (PROMPT, candidates[0], candidates[1])


def test_chat_without_a_template_is_a_clear_error(tmp_path, tiny_model_dir, capsys):
    import shutil

    model = tmp_path / "no-template"
    shutil.copytree(tiny_model_dir, model)
    (model / "chat_template.jinja").unlink()
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(f'{{"prompt": "{PROMPT}"}}\n')
    code = main(["annotate", "import", str(prompts), "--db", f"sqlite:///{tmp_path / 'b.db'}", "--project", "p",
                 "--model", str(model), "--chat"])
    assert code == 2 and "no chat template" in capsys.readouterr().err
