"""The table of preference (DPO-family) losses: one row per loss, declared once, beside its function.

A pair loss is a function in ``preftune/losses/`` under a ``@pair_loss(...)`` decorator whose keyword
arguments are the loss's row: its ``name`` (the ``loss_type``), the config fields it takes (``hyper``,
besides ``beta``), whether it ``needs_reference``, its ``paper``, its TRL 1.16 name (``trl``, None when
TRL has no such loss), the ``beta_range`` practitioners use, and a short ``formula`` for the README.

The settings layer must offer these names (choices, help texts, sanity ranges, which losses load no
reference) without importing torch or anything below it, so this module reads the rows from the loss
modules' source text (:func:`ast.literal_eval` of the decorator's arguments: literals only) rather
than importing them. The losses layer binds each name to its function by importing the module the
row was found in (``preftune.losses.preference.pair_loss_function``); at import time the decorator
checks that the row it receives is the row this module read. Adding a loss is therefore one function
with its row, in one module of ``preftune/losses/``, and its test.
"""

from __future__ import annotations

import ast
import difflib
from dataclasses import dataclass
from pathlib import Path

from ..errors import ConfigError

LOSSES_DIR = Path(__file__).resolve().parents[1] / "losses"
F_DIVERGENCES = ("reverse_kl", "forward_kl", "js_divergence", "alpha_divergence")   # f_divergence_type
# losses that sort values over the batch: WPO's per-pair weights (use_weighting) have no pair to follow there
UNWEIGHTABLE = ("aot", "aot_unpaired")
# options that modify every pair loss (preftune/losses/weighting.py): (option, what it does, paper, TRL 1.16 name)
LOSS_MODIFIERS = (
    ("ld_alpha", "log π(y) → Σ_{j<ℓ} log π(y_j) + α·Σ_{j≥ℓ} log π(y_j), ℓ = min(n_c, n_r) (token counts), α in [0, 1], "
                 "policy and reference", "Liu et al. 2024 (LD-DPO)", "ld_alpha"),
    ("use_weighting", "each pair's loss × exp(mean_j[log π(y_c,j) − log Σ_v π(v)²] + the same over y_r), "
                      "no gradient; not " + " or ".join(UNWEIGHTABLE), "Zhou et al. 2024 (WPO)", "use_weighting"),
)
ROW_FIELDS = ("name", "hyper", "needs_reference", "paper", "trl", "beta_range", "formula")


@dataclass(frozen=True)
class LossSpec:
    name: str                       # the loss_type
    module: str                     # the module that holds the function
    function: str                   # the function's name there
    hyper: tuple[str, ...]          # config fields it takes, besides beta
    needs_reference: bool           # False: trains with no reference model loaded
    paper: str
    trl: str | None                 # TRL 1.16's name (DPOConfig.loss_type unless said otherwise)
    beta_range: tuple[float, float] | None  # the usual range (a sanity note outside it); None: beta unused
    formula: str                    # one line for the README table


def pair_loss(**row):
    """Marks a function as the pair loss of ``row`` (see the module docstring); the function is unchanged."""
    missing = set(ROW_FIELDS) - set(row)
    if missing or set(row) - set(ROW_FIELDS):
        raise TypeError(f"a pair-loss row has exactly the fields {ROW_FIELDS}; got {sorted(row)}")

    def mark(fn):
        declared = PAIR_LOSSES.get(row["name"])
        if declared is None or declared.function != fn.__name__ or _row(declared) != _normalised(row):
            raise RuntimeError(f"the row of pair loss '{row['name']}' must be literal keyword arguments of "
                               f"@pair_loss directly on its function, so that the settings can read it")
        fn.loss_spec = declared
        return fn

    return mark


def _normalised(row: dict) -> dict:
    span = row["beta_range"]
    return {**row, "hyper": tuple(row["hyper"]), "beta_range": None if span is None else tuple(span)}


def _row(spec: LossSpec) -> dict:
    return {name: getattr(spec, name) for name in ROW_FIELDS}


def _read_rows(directory: Path = LOSSES_DIR) -> dict[str, LossSpec]:
    """Every ``@pair_loss(...)`` row in the modules of ``directory``, read from their source."""
    specs: dict[str, LossSpec] = {}
    for path in sorted(directory.glob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if not isinstance(node, ast.FunctionDef):
                continue
            for decorator in node.decorator_list:
                if isinstance(decorator, ast.Call) and getattr(decorator.func, "id", None) == "pair_loss":
                    try:
                        row = _normalised({kw.arg: ast.literal_eval(kw.value) for kw in decorator.keywords})
                    except (ValueError, KeyError) as exc:
                        raise RuntimeError(f"{path.name}: the @pair_loss row of {node.name} must be literal keyword "
                                           f"arguments with the fields {ROW_FIELDS} ({exc})") from None
                    if row["name"] in specs:
                        raise RuntimeError(f"pair loss '{row['name']}' is declared twice")
                    specs[row["name"]] = LossSpec(module=f"preftune.losses.{path.stem}", function=node.name, **row)
    return specs


PAIR_LOSSES: dict[str, LossSpec] = _read_rows()
PAIR_LOSS_NAMES: list[str] = sorted(PAIR_LOSSES, key=lambda name: (name != "sigmoid", name))
REFERENCE_FREE: frozenset[str] = frozenset(n for n, s in PAIR_LOSSES.items() if not s.needs_reference)
# every config field some pair loss takes (beta is common to all)
LOSS_HYPERPARAMETERS: tuple[str, ...] = tuple(sorted({h for s in PAIR_LOSSES.values() for h in s.hyper}))


def parse_loss_types(loss_type: str | list[str]) -> list[str]:
    """``"sigmoid"``, ``"sigmoid,bco_pair,sft"`` or a list -> the names, each checked against the table."""
    names = loss_type if isinstance(loss_type, list) else [n.strip() for n in str(loss_type).split(",")]
    if not names or any(not n for n in names):
        raise ConfigError(f"loss_type '{loss_type}': give one loss name, or several separated by commas")
    for name in names:
        if name not in PAIR_LOSSES:
            hint = difflib.get_close_matches(name, PAIR_LOSS_NAMES, n=1)
            raise ConfigError(f"unknown loss_type '{name}'" + (f" (did you mean '{hint[0]}'?)" if hint else "")
                              + f"; the preference losses are: {', '.join(PAIR_LOSS_NAMES)}")
    if len(set(names)) != len(names):
        raise ConfigError(f"loss_type '{loss_type}' names a loss twice")
    return names


def needs_reference(loss_type: str | list[str]) -> bool:
    """Whether any of the losses needs reference log-probs (otherwise no reference model is loaded)."""
    return any(PAIR_LOSSES[name].needs_reference for name in parse_loss_types(loss_type))


def beta_range(loss_type: str | list[str]) -> tuple[float, float]:
    """The usual range of beta for these losses (the widest span of their rows)."""
    ranges = [PAIR_LOSSES[name].beta_range for name in parse_loss_types(loss_type)]
    ranges = [r for r in ranges if r is not None] or [(0.0, float("inf"))]
    return min(r[0] for r in ranges), max(r[1] for r in ranges)


def loss_options(cfg) -> dict:
    """The config's values of the hyperparameters the chosen losses take (those the config has)."""
    wanted = {h for name in parse_loss_types(cfg.loss_type) for h in PAIR_LOSSES[name].hyper}
    return {h: getattr(cfg, h) for h in sorted(wanted) if hasattr(cfg, h)}


def check_loss_settings(cfg, defaults: dict) -> None:
    """Refuse a loss hyperparameter moved from its default when none of the chosen losses takes it."""
    names = parse_loss_types(cfg.loss_type)
    taken = {h for name in names for h in PAIR_LOSSES[name].hyper}
    for field in LOSS_HYPERPARAMETERS:
        if field in defaults and field not in taken and getattr(cfg, field) != defaults[field]:
            takers = [n for n in PAIR_LOSS_NAMES if field in PAIR_LOSSES[n].hyper]
            raise ConfigError(f"{field} is set but loss_type {','.join(names)} does not use it (losses that do: "
                              f"{', '.join(takers)})")
    weights = getattr(cfg, "loss_weights", [])
    if weights and len(weights) != len(names):
        raise ConfigError(f"{len(weights)} loss_weights for {len(names)} losses in loss_type {','.join(names)}")


def loss_help(prefix: str = "Preference loss") -> str:
    """The ``loss_type`` help text: every name, marking those that need no reference."""
    listed = ", ".join(n + ("" if PAIR_LOSSES[n].needs_reference else " (no reference)") for n in PAIR_LOSS_NAMES)
    return (f"{prefix}: {listed}. Several names separated by commas (a YAML list) are added, weighted by "
            f"loss_weights (MPO). See the README's loss table.")


def markdown_table() -> str:
    """The README's loss table, generated from the rows (``python -m preftune.config.losses``)."""
    lines = ["| `loss_type` | loss (per pair) | paper | TRL 1.16 name | reference | options |",
             "| --- | --- | --- | --- | --- | --- |"]
    for name in PAIR_LOSS_NAMES:
        spec = PAIR_LOSSES[name]
        trl = f"`{spec.trl}`" if spec.trl else "—"
        options = ", ".join(f"`{h}`" for h in spec.hyper) or "—"
        lines.append(f"| `{name}` | {spec.formula} | {spec.paper} | {trl} | "
                     f"{'needed' if spec.needs_reference else 'none loaded'} | {options} |")
    lines += ["", "Options of `preftune dpo` (and `iterate`) that modify every loss above:", "",
              "| option | effect | paper | TRL 1.16 name |", "| --- | --- | --- | --- |"]
    lines += [f"| `{option}` | {effect} | {paper} | `{trl}` |" for option, effect, paper, trl in LOSS_MODIFIERS]
    return "\n".join(lines)


if __name__ == "__main__":
    print(markdown_table())
