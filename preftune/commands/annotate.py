"""``preftune annotate ...``: the preference collection server and its admin commands (listed in :mod:`.table`)."""

from __future__ import annotations

import json
import re
import sys

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from preftune.errors import ConfigError

out = Console()
err = Console(stderr=True)
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")


def shown(value) -> str:
    """User-given text (project and annotator names) for the terminal: control characters written as escapes
    (no terminal sequences get through) and rich markup escaped (a name like ``[/oops]`` prints as itself)."""
    return escape(_CONTROL.sub(lambda m: f"\\x{ord(m.group()):02x}", str(value)))


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
    if importlib.util.find_spec("preftune.recipes.reward") is None:
        raise ConfigError("--reward-model needs preftune.recipes.reward, which this installation lacks")
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
