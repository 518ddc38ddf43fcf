"""The options of the ``preftune annotate ...`` commands (their handlers are in :mod:`.annotate`)."""

from __future__ import annotations

import argparse

from . import add_flag


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
