"""``preftune annotate ...``: the preference collection server and its admin commands (listed in :mod:`.table`)."""

from __future__ import annotations

import argparse
import json
import re
import sys

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from preftune.errors import ConfigError

from . import add_flag

out = Console()
err = Console(stderr=True)
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")


def shown(value) -> str:
    """User-given text (project and annotator names) for the terminal: control characters written as escapes
    (no terminal sequences get through) and rich markup escaped (a name like ``[/oops]`` prints as itself)."""
    return escape(_CONTROL.sub(lambda m: f"\\x{ord(m.group()):02x}", str(value)))


def _db(parser) -> None:
    add_flag(parser, "db", default=None, metavar="URL",
             help="Database: an SQLite file path (default: $PREFTUNE_ANNOTATE_DB or annotations.db) or a "
                  "postgresql://user:password@host/name URL.")


def db_arguments(parser) -> None:
    """The commands that need nothing but the database (``migrate``, ``token list``)."""
    _db(parser)


def serve_arguments(serve) -> None:
    _db(serve)
    add_flag(serve, "host", default="127.0.0.1", help="Interface to listen on.")
    add_flag(serve, "port", type=int, default=8000, help="Port to listen on.")
    add_flag(serve, "reward_model", default=None, metavar="PATH",
             help="Serve first the items this reward model separates least (active learning); re-ranks when it "
                  "changes.")
    add_flag(serve, "rerank_interval", type=float, default=60.0, help="Seconds between checks for a changed reward "
                                                                      "model.")
    add_flag(serve, "max_body", type=int, default=1_000_000, help="Largest request body accepted, in bytes.")
    add_flag(serve, "lease_minutes", type=float, default=30.0,
             help="How long a served but unlabelled item stays reserved for its annotator.")
    add_flag(serve, "secure_cookies", action="store_true", help="Mark cookies Secure (when served over HTTPS).")
    add_flag(serve, "threads", type=int, default=8, help="Worker threads for database calls.")
    add_flag(serve, "trusted_proxies", default="", metavar="ADDRESSES",
             help="Comma-separated addresses of reverse proxies whose X-Forwarded-For / X-Forwarded-Proto headers "
                  "name the client (e.g. 127.0.0.1 behind a local nginx). Default: none; every header is ignored and "
                  "the login rate limit counts the connection's own address.")
    add_flag(serve, "log_level", default="info", choices=["critical", "error", "warning", "info", "debug"],
             help="Server log level.")


def import_arguments(imp) -> None:
    imp.add_argument("file", help="JSONL, JSON, CSV or Parquet file.")
    _db(imp)
    add_flag(imp, "project", required=True, help="Project name.")
    add_flag(imp, "kind", choices=["pairwise", "ranking", "rating", "binary"], default=None,
             help="Question: pairwise (A / B / tie, optional strength), ranking (order N), rating (1-7 each), "
                  "binary (thumbs up / down on one response; a row's several responses become one item each). "
                  "New projects default to pairwise.")
    _project_settings(imp, "Annotators per item (new projects: 1).", "(new projects: yes)")
    add_flag(imp, "model", default=None, metavar="PATH", help="Generate the candidates with this model.")
    add_flag(imp, "num_candidates", type=int, default=2, help="Responses sampled per prompt with --model.")
    add_flag(imp, "max_new_tokens", type=int, default=None, help="Sampling: longest response.")
    add_flag(imp, "temperature", type=float, default=None, help="Sampling temperature.")
    add_flag(imp, "top_p", type=float, default=None, help="Sampling nucleus.")
    add_flag(imp, "top_k", type=int, default=None, help="Sampling top-k.")
    add_flag(imp, "batch_size", type=int, default=16, help="Prompts per generation batch.")
    add_flag(imp, "seed", type=int, default=None, help="Seed for sampling and for the serving order.")
    add_flag(imp, "chat", action=argparse.BooleanOptionalAction, default=None,
             help="Sample under the model's chat template, a text prompt becoming one user message; on by default "
                  "when the model has a template (--no-chat: sample from the raw text). Such items export as "
                  "conversations.")


def project_arguments(project) -> None:
    project.add_argument("name", nargs="?", help="Project to show or change (omit to list all).")
    _db(project)
    _project_settings(project, "New number of annotators per item.", "")


def _project_settings(parser, overlap_help: str, notes_default: str) -> None:
    add_flag(parser, "guidelines", default=None, metavar="FILE", help="Markdown file shown to annotators.")
    add_flag(parser, "gold_rate", type=float, default=None,
             help="Share of the items served that are gold items (rows with a 'gold' answer: pairwise, the index "
                  "of the better response; binary, true/false; ranking, indices best first; rating, the scores), "
                  "mixed into each annotator's queue, never marked as gold on the page (new projects: 0).")
    add_flag(parser, "overlap", type=int, default=None, help=overlap_help)
    parser.add_argument("--notes", dest="allow_notes", action=argparse.BooleanOptionalAction, default=None,
                        help=f"Offer a free-text note per item {notes_default}".rstrip() + ".")


def token_add_arguments(add) -> None:
    add.add_argument("name")
    add.add_argument("--admin", action="store_true", help="May see progress, agreement and exports.")
    _db(add)


def token_name_arguments(parser) -> None:
    """``token rotate`` and ``token revoke``: the annotator's name."""
    parser.add_argument("name")
    _db(parser)


def member_arguments(parser) -> None:
    """``member add`` and ``member remove``: the project and the annotator's name."""
    parser.add_argument("project")
    parser.add_argument("name")
    _db(parser)


def member_list_arguments(parser) -> None:
    parser.add_argument("project")
    _db(parser)


def rank_arguments(rank) -> None:
    _db(rank)
    add_flag(rank, "project", default=None, help="Project (default: all).")
    add_flag(rank, "reward_model", required=True, metavar="PATH", help="Reward model directory.")
    add_flag(rank, "batch_size", type=int, default=16, help="Responses scored per batch.")


def export_arguments(export) -> None:
    _db(export)
    add_flag(export, "project", required=True, help="Project name.")
    add_flag(export, "output", required=True, metavar="FILE", help="JSONL file to write.")
    add_flag(export, "ties", choices=["drop", "keep"], default="drop",
             help="drop: ignore tie votes and split pairs; keep: a tie is half a vote each way, split pairs get "
                  "preference_prob 0.5.")
    add_flag(export, "min_votes", type=int, default=1, help="Leave out pairs with fewer counted votes.")
    add_flag(export, "margin_scale", type=float, default=0.0,
             help="Add a 'margin' column: this times the mean vote strength toward chosen (0: no column).")
    add_flag(export, "weighting", choices=["competence", "votes"], default="competence",
             help="competence: preference_prob / label_prob is the posterior that weighs each annotator by their "
                  "estimated competence (Dawid-Skene, anchored by gold items and adjudications); votes: the plain "
                  "majority and its vote share.")
    add_flag(export, "raw", action="store_true", help="Write every label as stored instead of aggregated pairs.")
    add_flag(export, "format", choices=["pairs", "kto"], default="pairs",
             help="pairs: prompt/chosen/rejected rows; kto: unpaired prompt/completion/label rows with label_prob "
                  "(binary thumbs; pairwise winner/loser; ranking best/worst; ratings above/below a threshold).")
    add_flag(export, "min_agreement", type=float, default=0.0,
             help="--format kto: leave out candidates whose label_prob (share of agreeing votes) is below this.")
    add_flag(export, "rating_threshold", type=float, default=None,
             help="--format kto, rating projects: scores above are desirable, below undesirable (default: midpoint).")


def stats_arguments(stats) -> None:
    _db(stats)
    add_flag(stats, "project", required=True, help="Project name.")
    add_flag(stats, "json", action="store_true", help="Print JSON.")


def open_db(url):
    from preftune.annotate.db import Database

    db = Database(url)
    before = db.upgrade()
    if before is not None and before != db.head_revision():
        err.print(f"upgraded the database schema from revision {before} to {db.head_revision()}")
    return db


def run_serve(args) -> int:
    import uvicorn

    from preftune.annotate.app import ServerSettings, create_app

    if args.max_body < 1024:
        raise ConfigError("--max_body must be at least 1024 bytes")
    if not 1 <= args.threads <= 256:
        raise ConfigError("--threads must be from 1 to 256")
    db = open_db(args.db)
    watcher = None
    if args.reward_model:
        watcher = _watcher(db, args.reward_model, args.rerank_interval)
    settings = ServerSettings(max_body=args.max_body, lease=args.lease_minutes * 60,
                              secure_cookies=args.secure_cookies, threads=args.threads)
    app = create_app(db, settings, watcher=watcher)
    err.print(f"serving on http://{args.host}:{args.port} (database: {_safe(db.url)})")
    trusted = ",".join(part.strip() for part in args.trusted_proxies.split(",") if part.strip())
    # uvicorn trusts X-Forwarded-For from 127.0.0.1 by default: anyone connecting through loopback would choose
    # their own address (and escape the login limit); headers count only from proxies named here
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level, server_header=False,
                proxy_headers=bool(trusted), forwarded_allow_ips=trusted or None)
    return 0


def _safe(url: str) -> str:
    from preftune.annotate.db import safe_url

    return safe_url(url)


def _watcher(db, path: str, interval: float):
    import importlib.util
    from pathlib import Path

    from preftune.annotate.ordering import RewardModelWatcher

    if not Path(path).exists():
        raise ConfigError(f"reward model {path} not found")
    if importlib.util.find_spec("preftune.train.reward") is None:
        raise ConfigError("--reward-model needs preftune.train.reward, which this installation lacks")
    watcher = RewardModelWatcher(db, path, interval=interval)
    watcher.check_once()  # rank before the first annotator arrives; later changes re-rank in the background
    return watcher


def _existing_kind(db, name: str) -> str | None:
    from sqlalchemy import select

    from preftune.annotate.models import Project

    with db.read() as session:
        return session.scalar(select(Project.kind).where(Project.name == name))


def run_import(args) -> int:
    from preftune.annotate.importer import add_items, ensure_project, generate_candidates, read_guidelines, read_items

    if args.num_candidates < 1:
        raise ConfigError("--num_candidates must be at least 1")
    guidelines = read_guidelines(args.guidelines)
    db = open_db(args.db)
    minimum = 1 if (args.kind or _existing_kind(db, args.project)) == "binary" else 2
    specs = read_items(args.file, generating=bool(args.model), minimum=minimum)
    if args.model:
        sampling = {key: value for key, value in (("max_new_tokens", args.max_new_tokens),
                                                  ("temperature", args.temperature), ("top_p", args.top_p),
                                                  ("top_k", args.top_k)) if value is not None}
        generate_candidates(specs, args.model, args.num_candidates, sampling, batch_size=args.batch_size,
                            seed=args.seed, chat=args.chat, minimum=minimum)
    with db.write() as session:
        project, created = ensure_project(session, args.project, args.kind, guidelines, args.overlap, args.allow_notes,
                                          args.gold_rate)
        added, present = add_items(session, project, specs, seed=args.seed)
        kind = project.kind
    what = "created" if created else "updated"
    out.print(f"project {shown(repr(args.project))} ({kind}) {what}: {added} items added"
              + (f", {present} already present" if present else ""))
    return 0


def run_project(args) -> int:
    from sqlalchemy import select

    from preftune.annotate.importer import ensure_project, get_project, read_guidelines
    from preftune.annotate.models import Project
    from preftune.annotate.queue import project_progress

    db = open_db(args.db)
    with db.write() as session:
        if args.name is None:
            projects = list(session.scalars(select(Project).order_by(Project.name)))
        else:
            get_project(session, args.name)
            guidelines = read_guidelines(args.guidelines)
            projects = [ensure_project(session, args.name, None, guidelines, args.overlap, args.allow_notes,
                                       args.gold_rate)[0]]
        table = Table("project", "kind", "overlap", "notes", "items", "labels", "complete items")
        for p in projects:
            progress = project_progress(session, p)
            table.add_row(shown(p.name), p.kind, str(p.overlap), "yes" if p.allow_notes else "no",
                          str(progress["items"]),
                          f"{progress['labels']} / {progress['wanted']}", str(progress["complete_items"]))
    out.print(table)
    return 0


def run_token(args) -> int:
    from preftune.annotate import tokens

    db = open_db(args.db)
    with db.write() as session:
        if args.token_command == "add":
            _, token = tokens.add_annotator(session, args.name, is_admin=args.admin)
        elif args.token_command == "rotate":
            token = tokens.rotate_token(session, args.name)
        elif args.token_command == "revoke":
            tokens.revoke(session, args.name)
            out.print(f"revoked {shown(args.name)}")
            return 0
        else:
            table = Table("name", "role", "status")
            for annotator in tokens.list_annotators(session):
                table.add_row(shown(annotator.name), "admin" if annotator.is_admin else "annotator",
                              "active" if annotator.active else "revoked")
            out.print(table)
            return 0
    err.print(f"token for {args.name} (shown once; only its hash is stored):")
    print(token)
    return 0


def run_member(args) -> int:
    from preftune.annotate import members

    db = open_db(args.db)
    with db.write() as session:
        if args.member_command == "list":
            names = members.list_members(session, args.project)
            out.print("\n".join(map(shown, names)) if names
                      else f"project {shown(repr(args.project))} has no members yet")
        elif args.member_command == "add":
            added = members.add_member(session, args.project, args.name)
            out.print(f"{shown(args.name)} {'added to' if added else 'is already a member of'} {shown(args.project)}")
        else:
            removed = members.remove_member(session, args.project, args.name)
            what = "removed from" if removed else "was not a member of"
            out.print(f"{shown(args.name)} {what} {shown(args.project)}")
    return 0


def run_rank(args) -> int:
    from preftune.annotate.importer import get_project
    from preftune.annotate.ordering import rerank_all, rerank_project, reward_model_scorer

    db = open_db(args.db)
    if args.project:
        with db.read() as session:
            get_project(session, args.project)
    scorer = reward_model_scorer(args.reward_model, batch_size=args.batch_size)
    if args.project:
        count = rerank_project(db, args.project, scorer, args.reward_model)
    else:
        count = rerank_all(db, scorer, args.reward_model)
    out.print(f"ranked {count} items: the least separated are served first")
    return 0


def run_export(args) -> int:
    from preftune.annotate.aggregate import export_pairs, export_raw, write_jsonl
    from preftune.annotate.importer import get_project
    from preftune.annotate.unpaired import export_kto

    if args.min_votes < 1:
        raise ConfigError("--min_votes must be at least 1")
    if args.raw and args.format != "pairs":
        raise ConfigError("--raw writes every label as stored; leave out --format")
    db = open_db(args.db)
    with db.read() as session:
        project = get_project(session, args.project)
        if args.raw:
            rows = export_raw(session, project)
        elif args.format == "kto":
            rows = export_kto(session, project, min_agreement=args.min_agreement, min_votes=args.min_votes,
                              rating_threshold=args.rating_threshold, weighting=args.weighting)
        else:
            rows = export_pairs(session, project, ties=args.ties, min_votes=args.min_votes,
                                margin_scale=args.margin_scale, weighting=args.weighting)
    path = write_jsonl(rows, args.output)
    what = "labels" if args.raw else "KTO rows" if args.format == "kto" else "pairs"
    out.print(f"wrote {len(rows)} {what} to {shown(path)}")
    if not rows:
        err.print("[yellow]nothing to export yet: no labels (or no pair with a majority)")
    return 0


def _fmt(value, digits: int = 2) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def run_stats(args) -> int:
    from preftune.annotate.admin import project_report
    from preftune.annotate.importer import get_project

    db = open_db(args.db)
    with db.read() as session:
        report = project_report(session, get_project(session, args.project))
    if args.json:
        json.dump(report, sys.stdout, indent=2)
        print()
        return 0
    progress, agreement = report["progress"], report["agreement"]
    out.print(f"[bold]{shown(report['name'])}[/] ({report['kind']}, {report['overlap']} per item): "
              f"{progress['labels']} of {progress['wanted']} labels, "
              f"{progress['complete_items']} of {progress['items']} items complete")
    out.print(f"{agreement['headline']['name']}: {_fmt(agreement['headline']['value'])}   "
              f"Krippendorff's alpha ({agreement['metric']}): {_fmt(agreement['krippendorff_alpha'])}   "
              f"mean pairwise kappa: {_fmt(agreement['mean_pairwise_kappa'])}   "
              f"({agreement['raters']} annotators, {agreement['shared_units']} shared units)")
    out.print(f"gold items: {progress['gold_items']} (served at rate {report['gold_rate']:.2f})   "
              f"disputed items: {report['disputed_items']}   competence: {report['competence']['model']}")
    table = Table("annotator", "labels", "skips", "agreement with majority", "median seconds", "first shown wins",
                  "gold accuracy", "competence (90% interval)", "flag")
    for s in report["stats"]:
        c = s["competence"]
        table.add_row(shown(s["annotator"]), str(s["labels"]), str(s["skips"]),
                      f"{_fmt(s['agreement_with_majority'])} ({s['compared']})", _fmt(s["median_seconds"], 1),
                      f"{_fmt(s['first_shown_wins'])} ({s['decided']})",
                      f"{_fmt(s['gold_accuracy'])} ({s['gold_compared']})",
                      f"{_fmt(c['competence'])} ({_fmt(c['low'])}-{_fmt(c['high'])})" if c else "n/a",
                      (c or {}).get("flag") or "")
    out.print(table)
    return 0


def run_migrate(args) -> int:
    db = open_db(args.db)
    out.print(f"database schema at revision {db.head_revision()}")
    return 0
