"""Projects and their items: prompts with 2..N candidate responses, from a file or sampled from a model.

Input rows (any file ``preftune.data.load_records`` reads: JSONL, JSON, CSV, Parquet):
``prompt`` (a string, or a conversation: a list of chat messages) plus the candidates as ``responses``
(a list), ``response_1``, ``response_2``, ... columns (binary projects also: one ``completion``),
or ``chosen`` / ``rejected``; optional ``id``. A bad row stops the import with the same row-numbered
message as bad training data. Items already in the project (same id) are left alone.

A conversation prompt is shown to annotators as "role: content" lines and kept in the item's
``meta["prompt_messages"]``: candidates sampled from a model, and the reward model ordering the
queue, read it through their own chat templates. Candidates sampled from a model that has a chat
template are sampled under it (``--no-chat``: from the raw text), a text prompt becoming one user
message. Such items are exported in the conversational format (:func:`training_prompt`,
:func:`training_response`), so that ``preftune dpo`` trains on the context the samples came from.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
import time
from dataclasses import dataclass, field
from itertools import combinations
from pathlib import Path

from sqlalchemy import func, insert, select, text, update

from preftune.data.images import check_parts, text_only
from preftune.data.load import load_records
from preftune.data.messages import check_messages, plain_text
from preftune.data.rows import InvalidRow
from preftune.errors import ConfigError, DataError, PreftuneError

from .answers import LETTERS, MAX_CANDIDATES
from .images import row_images
from .models import KINDS, Item, Label, Project

MAX_TEXT = 100_000
RESPONSE_COLUMN = re.compile(r"^response_(\d+)$")
RESERVED = {"id", "prompt", "responses", "chosen", "rejected", "completion", "images", "image", "gold"}


class ProjectError(PreftuneError):
    """A project that is missing, exists already, or is given bad settings."""


@dataclass
class ItemSpec:
    external_id: str
    prompt: str
    candidates: list[str]
    meta: dict = field(default_factory=dict)
    row: int = 0
    gold: object = None  # the row's ``gold`` value as given (see gold_answer)

    @property
    def model_prompt(self) -> str | list:
        """What a model reads: the conversation when the prompt is one, else the text."""
        return self.meta.get("prompt_messages") or self.prompt


def training_prompt(item) -> str | list:
    """An item's prompt as exported for training: its conversation when it has one, else the text."""
    return (item.meta or {}).get("prompt_messages") or item.prompt


def training_response(item, text: str) -> str | list:
    """A candidate as exported for training: the assistant's message when the prompt is a conversation."""
    return [{"role": "assistant", "content": text}] if (item.meta or {}).get("prompt_messages") else text


def get_project(session, name: str) -> Project:
    project = session.scalar(select(Project).where(Project.name == name))
    if project is None:
        known = ", ".join(session.scalars(select(Project.name).order_by(Project.name))) or "none yet"
        raise ProjectError(f"no project named {name!r} (projects: {known})")
    return project


def read_guidelines(path: str | None) -> str | None:
    if path is None:
        return None
    try:
        return Path(path).expanduser().read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read guidelines file {path}: {exc}") from None


def ensure_project(session, name: str, kind: str | None = None, guidelines: str | None = None,
                   overlap: int | None = None, allow_notes: bool | None = None,
                   gold_rate: float | None = None) -> tuple[Project, bool]:
    """Get the project, creating it when new; given settings update it. Returns (project, created)."""
    if not name or len(name) > 200:
        raise ProjectError("a project name must have 1 to 200 characters")
    if kind is not None and kind not in KINDS:
        raise ProjectError(f"question kind must be one of {', '.join(KINDS)}, got {kind!r}")
    if overlap is not None and not 1 <= overlap <= 100:
        raise ProjectError(f"overlap (annotators per item) must be from 1 to 100, got {overlap}")
    if gold_rate is not None and not 0.0 <= gold_rate <= 1.0:  # also refuses NaN
        raise ProjectError(f"gold_rate (share of items served that are gold) must be from 0 to 1, got {gold_rate}")
    project = session.scalar(select(Project).where(Project.name == name))
    created = project is None
    if created:
        project = Project(name=name, kind=kind or "pairwise", guidelines="", overlap=1, allow_notes=True,
                          created_at=time.time(), gold_rate=0.0)
        session.add(project)
    elif kind is not None and kind != project.kind:
        has_items = session.scalar(select(func.count()).select_from(Item).where(Item.project_id == project.id))
        if has_items:
            raise ProjectError(f"project {name!r} asks for {project.kind} answers; it cannot become {kind} "
                               "once it has items (start a new project)")
        project.kind = kind
    if guidelines is not None:
        project.guidelines = guidelines
    if overlap is not None and overlap != project.overlap:
        project.overlap = overlap
        if not created:
            refresh_complete(session, project)
    if allow_notes is not None:
        project.allow_notes = allow_notes
    if gold_rate is not None:
        project.gold_rate = gold_rate
    session.flush()
    return project, created


def refresh_complete(session, project: Project) -> None:
    """Recompute which items have all their labels (after the project's overlap changed)."""
    session.flush()
    labels = select(func.count()).select_from(Label).where(Label.item_id == Item.id).scalar_subquery()
    session.execute(update(Item).where(Item.project_id == project.id, Item.is_gold.is_(False))
                    .values(complete=labels >= project.overlap))


def _text(source: str, number: int, name: str, value) -> str:
    if not isinstance(value, str):
        got = "missing" if value is None else f"got {type(value).__name__}"
        raise DataError(source, f"expected a non-empty string, {got}", row=number, field=name)
    if not value.strip():
        raise DataError(source, "is empty", row=number, field=name)
    if len(value) > MAX_TEXT:
        raise DataError(source, f"longer than {MAX_TEXT} characters ({len(value)})", row=number, field=name)
    return _storable(source, number, name, value)


def _storable(source: str, number: int, name: str, value: str) -> str:
    """Text both databases can store: PostgreSQL refuses NUL characters, and UTF-8 lone surrogates."""
    if "\x00" in value:
        raise DataError(source, "contains a NUL character", row=number, field=name)
    if not value.isascii():
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise DataError(source, "is not valid Unicode text (a lone surrogate)", row=number, field=name) from None
    return value


def _prompt(source: str, row: dict, number: int) -> tuple[str, list | None]:
    """(text shown to annotators, the conversation or None) of the row's prompt."""
    value = row.get("prompt")
    if not isinstance(value, list):
        return _text(source, number, "prompt", value), None
    try:
        check_parts("prompt", value)   # image parts: the images themselves come from the images column
        shown = check_messages("prompt", text_only(value))
    except InvalidRow as invalid:
        raise invalid.problem(source, number).error from None
    if not any(m["content"].strip() for m in shown):
        raise DataError(source, "is empty (no message has content)", row=number, field="prompt")
    return _text(source, number, "prompt", plain_text(shown)), value


def _candidates(source: str, row: dict, number: int, required: int) -> list[str]:
    numbered = sorted((int(m.group(1)), key) for key in row if (m := RESPONSE_COLUMN.match(key)))
    if row.get("responses") is not None:
        value = row["responses"]
        if not isinstance(value, list):
            raise DataError(source, f"expected a list of strings, got {type(value).__name__}", row=number,
                            field="responses")
        texts = [_text(source, number, f"responses[{i}]", v) for i, v in enumerate(value)]
    elif numbered:
        present = [(n, key) for n, key in numbered if row[key] not in (None, "")]
        texts = [_text(source, number, key, row[key]) for _, key in present]
    elif required == 1 and row.get("completion") is not None:
        texts = [_text(source, number, "completion", row["completion"])]
    elif "chosen" in row or "rejected" in row:
        texts = [_text(source, number, key, row.get(key)) for key in ("chosen", "rejected")]
    elif required == 0:
        return []
    else:
        raise DataError(source, "no candidate responses: give 'responses' (a list), 'response_1', "
                                "'response_2', ... columns, or 'chosen' and 'rejected'", row=number)
    if len(texts) < required:
        raise DataError(source, f"needs at least {required} candidate responses, got {len(texts)}", row=number,
                        field="responses")
    if len(texts) > MAX_CANDIDATES:
        raise DataError(source, f"at most {MAX_CANDIDATES} candidate responses, got {len(texts)}", row=number,
                        field="responses")
    for a, b in combinations(range(len(texts)), 2):
        if texts[a] == texts[b]:
            raise DataError(source, f"candidates {a + 1} and {b + 1} are identical", row=number, field="responses")
    return texts


def _row_id(source: str, row: dict, number: int, prompt: str | list, candidates: list[str]) -> str:
    value = row.get("id")
    if value is None or value == "":
        digest = hashlib.sha256(json.dumps([prompt, candidates]).encode()).hexdigest()
        return digest[:20]
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise DataError(source, f"expected a string or integer, got {type(value).__name__}", row=number, field="id")
    text = str(value)
    if len(text) > 150:
        raise DataError(source, "longer than 150 characters", row=number, field="id")
    return _storable(source, number, "id", text)


def _meta(row: dict) -> dict:
    plain = (str, int, float, bool, type(None))
    return {k: v for k, v in row.items()
            if k not in RESERVED and not RESPONSE_COLUMN.match(k) and isinstance(v, plain)}


def read_items(source: str, generating: bool = False, minimum: int = 2) -> list[ItemSpec]:
    """Validate every row of an import file; with ``generating`` the candidates may be absent.

    ``minimum``: candidates a row needs (1 for binary projects, which also read a ``completion`` column)."""
    records = load_records(source)
    specs, seen = [], {}
    for row, number in zip(records.rows, records.row_numbers):
        prompt, messages = _prompt(records.name, row, number)
        candidates = _candidates(records.name, row, number, 0 if generating else minimum)
        external_id = _row_id(records.name, row, number, messages or prompt, candidates)
        if external_id in seen:
            raise DataError(records.name, f"duplicate id {external_id!r} (first used on row {seen[external_id]})",
                            row=number, field="id")
        seen[external_id] = number
        meta = {**_meta(row), "prompt_messages": messages} if messages else _meta(row)
        meta.update(row_images(records.name, row, number))
        specs.append(ItemSpec(external_id, prompt, candidates, meta, number, row.get("gold")))
    return specs


def generate_candidates(specs: list[ItemSpec], model_path: str, n: int, sampling: dict | None = None,
                        batch_size: int = 16, seed: int | None = None, chat: bool | None = None,
                        minimum: int = 2, engine: str = "transformers") -> None:
    """Add ``n`` responses sampled from the model at ``model_path`` to every item (empty and repeated ones dropped).

    ``chat``: sample under the model's chat template, a text prompt becoming one user message (None: when the
    model has a template; conversations are always rendered). ``minimum``: different responses an item needs
    (1 for binary projects); ``engine``: the generation engine that samples them (:mod:`preftune.engines`:
    transformers or vllm)."""
    from preftune.engines import make_engine
    from preftune.generate import SamplingSettings, generate_texts
    from preftune.models import load_causal_lm, load_tokenizer

    if any(spec.meta.get("image_data") for spec in specs):
        raise ConfigError("sampling candidates for prompts with images is not supported; give the responses in "
                          "the file")
    settings = SamplingSettings(**(sampling or {}))
    try:
        settings.validate()
    except ValueError as exc:
        raise ConfigError(f"sampling: {exc}") from None
    if not 1 <= n <= MAX_CANDIDATES:
        raise ConfigError(f"the number of candidates to sample must be from 1 to {MAX_CANDIDATES}, got {n}")
    tokenizer = load_tokenizer(model_path)
    model = load_causal_lm(model_path)
    model.eval()
    if chat or (chat is None and getattr(tokenizer, "chat_template", None)):
        for spec in specs:   # the conversation the samples answer, kept for the export
            spec.meta.setdefault("prompt_messages", [{"role": "user", "content": spec.prompt}])
    sampler = make_engine(engine, model, tokenizer, batch_size=batch_size, model_path=model_path, seed=seed,
                          gpu_memory_utilization=0.9)
    outputs = generate_texts(model, tokenizer, [s.model_prompt for s in specs], settings, n=n, batch_size=batch_size,
                             seed=seed, engine=sampler)
    for spec, texts in zip(specs, outputs):
        spec.meta["generated_by"] = str(model_path)
        for sample in texts:
            if sample.strip() and sample not in spec.candidates and len(spec.candidates) < MAX_CANDIDATES:
                spec.candidates.append(sample)
        if len(spec.candidates) < minimum:
            raise DataError(str(model_path), f"item {spec.external_id!r} (row {spec.row}): the model gave fewer than "
                                             f"{minimum} different responses; sample with a higher temperature or "
                                             "larger n")


def split_pairs(spec: ItemSpec) -> list[ItemSpec]:
    """For pairwise projects: an item with N > 2 candidates becomes one item per pair."""
    if len(spec.candidates) == 2:
        return [spec]
    return [ItemSpec(f"{spec.external_id}:{i + 1}-{j + 1}", spec.prompt, [spec.candidates[i], spec.candidates[j]],
                     dict(spec.meta), spec.row) for i, j in combinations(range(len(spec.candidates)), 2)]


def split_single(spec: ItemSpec) -> list[ItemSpec]:
    """For binary projects: an item with N > 1 candidates becomes one item per candidate."""
    if len(spec.candidates) == 1:
        return [spec]
    return [ItemSpec(f"{spec.external_id}:{i + 1}", spec.prompt, [text], dict(spec.meta), spec.row)
            for i, text in enumerate(spec.candidates)]


def gold_answer(kind: str, value, n: int, where: str = "gold") -> dict:
    """A row's ``gold`` value as a canonical answer (what a label of the right answer would store).

    pairwise: the index (0-based, in the row's order; ``chosen`` is 0) of the better response, or "tie";
    binary: true / false (or "up" / "down"); ranking: the indices best first; rating: a score 1-7 each.
    """
    from .answers import AnswerError, parse_answer

    order = list(range(n))
    try:
        if kind == "pairwise":
            if value == "tie":
                return parse_answer(kind, {"choice": "tie"}, order)
            if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < n:
                raise AnswerError(f"expected the index of the better response (0 to {n - 1}) or 'tie', got {value!r}")
            return parse_answer(kind, {"choice": LETTERS[value]}, order)
        if kind == "binary":
            return parse_answer(kind, {"thumb": value}, order)
        if kind == "ranking":
            if not isinstance(value, list) or not all(isinstance(v, int) and 0 <= v < n for v in value):
                raise AnswerError(f"expected the response indices best first (0 to {n - 1}), got {value!r}")
            return parse_answer(kind, {"ranking": [LETTERS[v] for v in value]}, order)
        return parse_answer(kind, {"scores": value}, order)
    except AnswerError as exc:
        raise ProjectError(f"{where}: {exc}") from None


def add_items(session, project: Project, specs: list[ItemSpec], seed: int | None = None) -> tuple[int, int]:
    """Insert new items (random serving order); returns (added, already present).

    An item whose spec has a ``gold`` answer becomes a gold item (complete from the start: the ordinary
    queue never serves it; :func:`.queue.serve` mixes gold items in at the project's ``gold_rate``)."""
    if any(spec.gold is not None for spec in specs):
        if project.kind == "pairwise" and any(spec.gold is not None and len(spec.candidates) != 2 for spec in specs):
            raise ProjectError("a gold item of a pairwise project needs exactly 2 responses")
        if project.kind == "binary" and any(spec.gold is not None and len(spec.candidates) != 1 for spec in specs):
            raise ProjectError("a gold item of a binary project needs exactly 1 response")
    if project.kind == "pairwise":
        specs = [part for spec in specs for part in split_pairs(spec)]
    elif project.kind == "binary":
        specs = [part for spec in specs for part in split_single(spec)]
    for spec in specs:
        if len(spec.candidates) < 2 and project.kind != "binary":
            raise ProjectError(f"item {spec.external_id!r} (row {spec.row}) has one response: only binary projects "
                               "take one response per prompt")
    existing = set(session.scalars(select(Item.external_id).where(Item.project_id == project.id)))
    rng = random.Random(seed)
    now = time.time()
    rows = []
    for spec in specs:
        if spec.external_id in existing:
            continue
        existing.add(spec.external_id)
        where = f"item {spec.external_id!r} (row {spec.row})"
        gold = None if spec.gold is None else gold_answer(project.kind, spec.gold, len(spec.candidates), where)
        rows.append({"project_id": project.id, "external_id": spec.external_id, "prompt": spec.prompt,
                     "candidates": list(spec.candidates), "meta": spec.meta, "random_key": rng.random(),
                     "priority": 0.0, "complete": gold is not None, "created_at": now, "is_gold": gold is not None,
                     "gold": gold})
    session.flush()
    for start in range(0, len(rows), 10_000):  # core inserts: a 400k-item import takes seconds, not minutes
        session.execute(insert(Item), rows[start:start + 10_000])
    added = len(rows)
    if session.get_bind().dialect.name == "postgresql":
        session.execute(text("ANALYZE items"))  # fresh statistics keep the queue query on its index
    return added, len(specs) - added
