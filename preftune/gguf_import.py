"""GGUF in: a ``.gguf`` file (or a directory holding one) becomes an ordinary checkpoint, converted once.

transformers reads GGUF through the ``gguf`` package and de-quantises the weights to fp32. The result is
saved as an ordinary Hugging Face checkpoint under ``<cache>/gguf/<sha256 of the file>/`` (the cache is
``~/.cache/preftune`` or ``$PREFTUNE_CACHE``), so the conversion happens once per file content and every
command then loads, trains and saves the model like any other. The file's hash is itself remembered by
(path, size, modification time), so a second run does not read the whole file again.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import sys
from pathlib import Path

from .errors import ConfigError
from .gguf_metadata import carried_general, restore_digit_split

CACHE_ENV = "PREFTUNE_CACHE"
GGUF_MAGIC = b"GGUF"
SOURCE_FILE = "preftune-gguf.json"     # written last into a converted checkpoint: its presence means "complete"
FORMAT = 2     # of a converted checkpoint; an older one is converted again (2: general.* keys, digit split)
CHUNK = 1 << 22


def cache_root() -> Path:
    """Where preftune keeps downloaded and converted models: ``$PREFTUNE_CACHE`` or ``~/.cache/preftune``."""
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "preftune")


def find_gguf(name_or_path: str | os.PathLike) -> Path | None:
    """The GGUF file meant by ``name_or_path`` (a ``.gguf`` file, or a directory holding exactly one and no
    ``config.json``), or None when it names something else (a checkpoint directory, a hub name)."""
    path = Path(name_or_path)
    if path.suffix.lower() == ".gguf":
        if not path.is_file():
            raise ConfigError(f"GGUF file not found: {path}")
        return path
    if not path.is_dir() or (path / "config.json").exists() or (path / "adapter_config.json").exists():
        return None
    files = sorted(path.glob("*.gguf"))
    if len(files) > 1:
        raise ConfigError(f"{path} holds several GGUF files ({', '.join(f.name for f in files)}): name the one to use")
    return files[0] if files else None


def resolve_model_path(name_or_path: str | os.PathLike) -> str:
    """``name_or_path`` itself, or for a GGUF file the directory of its converted checkpoint."""
    gguf_file = find_gguf(name_or_path)
    return str(name_or_path) if gguf_file is None else str(converted_checkpoint(gguf_file))


def file_sha256(path: Path) -> str:
    """sha256 of the file's contents, read in chunks; remembered by (path, size, mtime) in the cache."""
    stat = path.stat()
    key = f"{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}"
    index_file = cache_root() / "gguf" / "hashes.json"
    index = _read_json(index_file)
    if key in index:
        return index[key]
    digest = sha256_of(path)
    index = _read_json(index_file)   # re-read: another process may have added entries meanwhile
    index[key] = digest
    _write_atomic(index_file, json.dumps(index, indent=1))
    return index[key]


def sha256_of(path: Path) -> str:
    """sha256 of a file's contents, read in chunks (a model file is never held in memory whole)."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def converted_checkpoint(path: Path) -> Path:
    """The cached ordinary checkpoint of a GGUF file, converting it on first use."""
    check_magic(path)
    digest = file_sha256(path)
    target = cache_root() / "gguf" / digest
    if _read_json(target / SOURCE_FILE).get("format") == FORMAT:
        return target
    reader = read_gguf(path)
    print(f"converting {path.name} once into an ordinary checkpoint: {target}", file=sys.stderr, flush=True)
    model, tokenizer = load_gguf(path)
    pre = field_value(reader, "tokenizer.ggml.pre")
    if pre:
        model.config.gguf_tokenizer_pre = pre   # kept through fine-tuning, for `preftune export gguf`
        restore_digit_split(tokenizer, pre)
    model.config.gguf_general = carried_general(reader)     # likewise general.name, .license, ...
    model.config.gguf_file = path.name                       # what an adapter trained on it names as its base
    partial = target.with_name(f"{digest}.partial-{os.getpid()}")
    shutil.rmtree(partial, ignore_errors=True)
    model.save_pretrained(partial)
    tokenizer.save_pretrained(partial)
    (partial / SOURCE_FILE).write_text(json.dumps({"source": str(path.resolve()), "sha256": digest, "format": FORMAT,
                                                   "architecture": field_value(reader, "general.architecture")}))
    if _read_json(target / SOURCE_FILE).get("format") != FORMAT:   # else another process finished it first
        shutil.rmtree(target, ignore_errors=True)  # an interrupted or older conversion
        with contextlib.suppress(OSError):
            partial.rename(target)
    shutil.rmtree(partial, ignore_errors=True)
    return target


def check_magic(path: Path) -> None:
    with path.open("rb") as handle:
        magic = handle.read(4)
    if magic != GGUF_MAGIC:
        raise ConfigError(f"{path}: not a GGUF file (it starts with {magic!r}, a GGUF file with {GGUF_MAGIC!r})")


def read_gguf(path: Path):
    """A ``gguf.GGUFReader`` of the file, or ConfigError saying why the file is not a usable GGUF."""
    check_magic(path)
    try:
        import gguf
    except ImportError:
        raise ConfigError("reading a .gguf file needs the 'gguf' package: pip install gguf") from None
    try:
        return gguf.GGUFReader(path)
    except (ValueError, KeyError, IndexError, OSError, TypeError) as exc:
        raise ConfigError(f"{path}: corrupt or unsupported GGUF file ({type(exc).__name__}: {exc})") from None


def field_value(reader, name: str):
    """A metadata value of a GGUF file (a string, number or list), or None."""
    field = reader.fields.get(name)
    return None if field is None else field.contents()


def load_gguf(path: Path):
    """``(model, tokenizer)`` from a GGUF file through transformers, as an ordinary (saveable) fp32 model."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    where, name = str(path.parent), path.name
    try:
        tokenizer = AutoTokenizer.from_pretrained(where, gguf_file=name)
        model = AutoModelForCausalLM.from_pretrained(where, gguf_file=name, dtype=torch.float32)
    except (OSError, ValueError, KeyError, IndexError, TypeError, RuntimeError, NotImplementedError) as exc:
        raise ConfigError(f"{path}: transformers cannot load this GGUF file ({type(exc).__name__}: {exc})") from None
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None:   # the weights are already de-quantised; the marker only blocks save_pretrained
        quantizer.remove_quantization_config(model)
    return model, tokenizer


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def _write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f"{path.name}.partial-{os.getpid()}")
    partial.write_text(text)
    os.replace(partial, path)
