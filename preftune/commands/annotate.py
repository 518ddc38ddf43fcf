"""``preftune annotate ...``: the preference collection server and its admin commands."""

from __future__ import annotations

import argparse
import json
import sys

from rich.console import Console
from rich.table import Table

from preftune.errors import ConfigError

out = Console()
err = Console(stderr=True)


def _flag(parser, name: str, **kwargs):
    """``--some-name`` with ``--some_name`` as an alias (the other commands use underscores)."""
    names = [f"--{name}"] + ([f"--{name.replace('-', '_')}"] if "-" in name else [])
    parser.add_argument(*names, dest=name.replace("-", "_"), **kwargs)


def _db(parser) -> None:
    _flag(parser, "db", default=None, metavar="URL",
          help="Database: an SQLite file path (default: $PREFTUNE_ANNOTATE_DB or annotations.db) or a "
               "postgresql://user:password@host/name URL.")


def register(subparsers) -> None:
    annotate = subparsers.add_parser("annotate", help="Collect human preferences: web app, items, tokens, export.",
                                     description="Collect preferences from people: import items, issue tokens, "
                                                 "serve the labelling app, then export training pairs.")
    commands = annotate.add_subparsers(dest="annotate_command", required=True, metavar="SUBCOMMAND")
    defaults = argparse.ArgumentDefaultsHelpFormatter

    serve = commands.add_parser("serve", help="Start the web app.", formatter_class=defaults)
    _db(serve)
    _flag(serve, "host", default="127.0.0.1", help="Interface to listen on.")
    _flag(serve, "port", type=int, default=8000, help="Port to listen on.")
    _flag(serve, "reward-model", default=None, metavar="PATH",
          help="Serve first the items this reward model separates least (active learning); re-ranks when it changes.")
    _flag(serve, "rerank-interval", type=float, default=60.0, help="Seconds between checks for a changed reward model.")
    _flag(serve, "max-body", type=int, default=1_000_000, help="Largest request body accepted, in bytes.")
    _flag(serve, "lease-minutes", type=float, default=30.0,
          help="How long a served but unlabelled item stays reserved for its annotator.")
    _flag(serve, "secure-cookies", action="store_true", help="Mark cookies Secure (when served over HTTPS).")
    _flag(serve, "threads", type=int, default=8, help="Worker threads for database calls.")
    _flag(serve, "log-level", default="info", choices=["critical", "error", "warning", "info", "debug"],
          help="Server log level.")
    serve.set_defaults(handler=run_serve)

    imp = commands.add_parser("import", help="Add items (a prompt and 2..N responses) to a project.",
                              formatter_class=defaults,
                              description="Rows need 'prompt' and the candidates as 'responses' (list), "
                                          "'response_1', 'response_2', ... or 'chosen'/'rejected'; optional 'id'. "
                                          "With --model the candidates are sampled instead. The project is "
                                          "created if new; the given settings update it.")
    imp.add_argument("file", help="JSONL, JSON, CSV or Parquet file.")
    _db(imp)
    _flag(imp, "project", required=True, help="Project name.")
    _flag(imp, "kind", choices=["pairwise", "ranking", "rating"], default=None,
          help="Question: pairwise (A / B / tie, optional strength), ranking (order N), rating (1-7 each). "
               "New projects default to pairwise.")
    _flag(imp, "guidelines", default=None, metavar="FILE", help="Markdown file shown to annotators.")
    _flag(imp, "overlap", type=int, default=None, help="Annotators per item (new projects: 1).")
    imp.add_argument("--notes", dest="allow_notes", action=argparse.BooleanOptionalAction, default=None,
                     help="Offer a free-text note per item (new projects: yes).")
    _flag(imp, "model", default=None, metavar="PATH", help="Generate the candidates with this model.")
    _flag(imp, "num-candidates", type=int, default=2, help="Responses sampled per prompt with --model.")
    _flag(imp, "max-new-tokens", type=int, default=None, help="Sampling: longest response.")
    _flag(imp, "temperature", type=float, default=None, help="Sampling temperature.")
    _flag(imp, "top-p", type=float, default=None, help="Sampling nucleus.")
    _flag(imp, "top-k", type=int, default=None, help="Sampling top-k.")
    _flag(imp, "batch-size", type=int, default=16, help="Prompts per generation batch.")
    _flag(imp, "seed", type=int, default=None, help="Seed for sampling and for the serving order.")
    _flag(imp, "chat", action="store_true", help="Render prompts with the tokenizer's chat template.")
    imp.set_defaults(handler=run_import)

    project = commands.add_parser("project", help="List projects, or show / change one.", formatter_class=defaults)
    project.add_argument("name", nargs="?", help="Project to show or change (omit to list all).")
    _db(project)
    _flag(project, "guidelines", default=None, metavar="FILE", help="New guidelines (markdown file).")
    _flag(project, "overlap", type=int, default=None, help="New number of annotators per item.")
    project.add_argument("--notes", dest="allow_notes", action=argparse.BooleanOptionalAction, default=None,
                         help="Offer a free-text note per item.")
    project.set_defaults(handler=run_project)

    token = commands.add_parser("token", help="Issue, list, rotate and revoke annotator tokens.")
    token_commands = token.add_subparsers(dest="token_command", required=True, metavar="ACTION")
    add = token_commands.add_parser("add", help="Create an annotator (or admin) and print its token once.")
    add.add_argument("name")
    add.add_argument("--admin", action="store_true", help="May see progress, agreement and exports.")
    rotate = token_commands.add_parser("rotate", help="Give an annotator a new token (the old one stops working).")
    rotate.add_argument("name")
    revoke = token_commands.add_parser("revoke", help="Disable an annotator's token (labels are kept).")
    revoke.add_argument("name")
    listing = token_commands.add_parser("list", help="List annotators (tokens are not stored, so not shown).")
    for sub in (add, rotate, revoke, listing):
        _db(sub)
        sub.set_defaults(handler=run_token)

    member = commands.add_parser("member", help="Choose who may see and label a project (admins see all).")
    member_commands = member.add_subparsers(dest="member_command", required=True, metavar="ACTION")
    for action, text in (("add", "Let an annotator see and label a project."),
                         ("remove", "Take an annotator off a project (their labels are kept).")):
        sub = member_commands.add_parser(action, help=text)
        sub.add_argument("project")
        sub.add_argument("name")
    listing = member_commands.add_parser("list", help="List a project's members.")
    listing.add_argument("project")
    for sub in member_commands.choices.values():
        _db(sub)
        sub.set_defaults(handler=run_member)

    rank = commands.add_parser("rank", help="Order a project's queue by a reward model (least separated first).",
                               formatter_class=defaults)
    _db(rank)
    _flag(rank, "project", default=None, help="Project (default: all).")
    _flag(rank, "reward-model", required=True, metavar="PATH", help="Reward model directory.")
    _flag(rank, "batch-size", type=int, default=16, help="Responses scored per batch.")
    rank.set_defaults(handler=run_rank)

    export = commands.add_parser("export", help="Write training pairs (preftune dpo / reward read them).",
                                 formatter_class=defaults)
    _db(export)
    _flag(export, "project", required=True, help="Project name.")
    _flag(export, "output", required=True, metavar="FILE", help="JSONL file to write.")
    _flag(export, "ties", choices=["drop", "keep"], default="drop",
          help="drop: ignore tie votes and split pairs; keep: a tie is half a vote each way, split pairs get "
               "preference_prob 0.5.")
    _flag(export, "min-votes", type=int, default=1, help="Leave out pairs with fewer counted votes.")
    _flag(export, "margin-scale", type=float, default=0.0,
          help="Add a 'margin' column: this times the mean vote strength toward chosen (0: no column).")
    _flag(export, "raw", action="store_true", help="Write every label as stored instead of aggregated pairs.")
    export.set_defaults(handler=run_export)

    stats = commands.add_parser("stats", help="Progress, inter-annotator agreement and per-annotator statistics.")
    _db(stats)
    _flag(stats, "project", required=True, help="Project name.")
    _flag(stats, "json", action="store_true", help="Print JSON.")
    stats.set_defaults(handler=run_stats)

    migrate = commands.add_parser("migrate", help="Upgrade the database schema (every command also does this).")
    _db(migrate)
    migrate.set_defaults(handler=run_migrate)


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
        raise ConfigError("--max-body must be at least 1024 bytes")
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
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level, server_header=False)
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


def run_import(args) -> int:
    from preftune.annotate.importer import add_items, ensure_project, generate_candidates, read_guidelines, read_items

    if args.num_candidates < 1:
        raise ConfigError("--num-candidates must be at least 1")
    guidelines = read_guidelines(args.guidelines)
    specs = read_items(args.file, generating=bool(args.model))
    if args.model:
        sampling = {key: value for key, value in (("max_new_tokens", args.max_new_tokens), ("temperature", args.temperature),
                                                  ("top_p", args.top_p), ("top_k", args.top_k)) if value is not None}
        generate_candidates(specs, args.model, args.num_candidates, sampling, batch_size=args.batch_size,
                            seed=args.seed, chat=args.chat)
    db = open_db(args.db)
    with db.write() as session:
        project, created = ensure_project(session, args.project, args.kind, guidelines, args.overlap, args.allow_notes)
        added, present = add_items(session, project, specs, seed=args.seed)
        kind = project.kind
    what = "created" if created else "updated"
    out.print(f"project {args.project!r} ({kind}) {what}: {added} items added"
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
            projects = [ensure_project(session, args.name, None, guidelines, args.overlap, args.allow_notes)[0]]
        table = Table("project", "kind", "overlap", "notes", "items", "labels", "complete items")
        for p in projects:
            progress = project_progress(session, p)
            table.add_row(p.name, p.kind, str(p.overlap), "yes" if p.allow_notes else "no", str(progress["items"]),
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
            out.print(f"revoked {args.name}")
            return 0
        else:
            table = Table("name", "role", "status")
            for annotator in tokens.list_annotators(session):
                table.add_row(annotator.name, "admin" if annotator.is_admin else "annotator",
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
            out.print("\n".join(names) if names else f"project {args.project!r} has no members yet")
        elif args.member_command == "add":
            added = members.add_member(session, args.project, args.name)
            out.print(f"{args.name} {'added to' if added else 'is already a member of'} {args.project}")
        else:
            removed = members.remove_member(session, args.project, args.name)
            out.print(f"{args.name} {'removed from' if removed else 'was not a member of'} {args.project}")
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

    if args.min_votes < 1:
        raise ConfigError("--min-votes must be at least 1")
    db = open_db(args.db)
    with db.read() as session:
        project = get_project(session, args.project)
        if args.raw:
            rows = export_raw(session, project)
        else:
            rows = export_pairs(session, project, ties=args.ties, min_votes=args.min_votes,
                                margin_scale=args.margin_scale)
    path = write_jsonl(rows, args.output)
    what = "labels" if args.raw else "pairs"
    out.print(f"wrote {len(rows)} {what} to {path}")
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
    out.print(f"[bold]{report['name']}[/] ({report['kind']}, {report['overlap']} per item): "
              f"{progress['labels']} of {progress['wanted']} labels, "
              f"{progress['complete_items']} of {progress['items']} items complete")
    out.print(f"{agreement['headline']['name']}: {_fmt(agreement['headline']['value'])}   "
              f"Krippendorff's alpha ({agreement['metric']}): {_fmt(agreement['krippendorff_alpha'])}   "
              f"mean pairwise kappa: {_fmt(agreement['mean_pairwise_kappa'])}   "
              f"({agreement['raters']} annotators, {agreement['shared_units']} shared units)")
    table = Table("annotator", "labels", "skips", "agreement with majority", "median seconds", "first shown wins")
    for s in report["stats"]:
        table.add_row(s["annotator"], str(s["labels"]), str(s["skips"]),
                      f"{_fmt(s['agreement_with_majority'])} ({s['compared']})", _fmt(s["median_seconds"], 1),
                      f"{_fmt(s['first_shown_wins'])} ({s['decided']})")
    out.print(table)
    return 0


def run_migrate(args) -> int:
    db = open_db(args.db)
    out.print(f"database schema at revision {db.head_revision()}")
    return 0
