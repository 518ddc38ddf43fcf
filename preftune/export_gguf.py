"""GGUF out: write a trained model (a LoRA adapter merged first) as a GGUF file for llama.cpp-family runtimes.

Uses the ``gguf`` package: its tensor-name map for the architecture, its writer, its quantiser (q8_0) and
its readers of merges, special-token ids and the chat template. Llama-family checkpoints only (model
types ``llama`` and ``mistral``, GGUF architecture ``llama``); others are refused with a clear error.

Two layout details a llama.cpp loader relies on:
- Rotary embeddings: Hugging Face Llama pairs dimension i with i + d/2 inside each head ("rotate half");
  GGUF's ``llama`` architecture pairs 2i with 2i + 1. The rows of the query and key projections are
  reordered accordingly (transformers undoes exactly this reordering when it reads a GGUF).
- Tied embeddings: no ``output.weight`` is written; the runtime reuses ``token_embd.weight``.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .errors import ConfigError
from .gguf_metadata import tokenizer_pre, write_general

DTYPES = ("f32", "f16", "q8_0")
ARCHITECTURES = {"llama": "llama", "mistral": "llama"}   # transformers model_type -> GGUF architecture
Q8_BLOCK = 32


@dataclass
class ExportResult:
    path: Path
    architecture: str
    dtype: str
    tensors: int
    fallback_f16: list[str]    # 2-D tensors written as f16 because q8_0 needs rows divisible by 32


def model_source(run_or_model_dir: str | Path) -> Path:
    """The checkpoint directory inside a run (``run/model``) or the directory itself."""
    path = Path(run_or_model_dir)
    if not path.exists():
        raise ConfigError(f"{path}: no such run or model directory")
    for candidate in (path / "model", path):
        if (candidate / "config.json").is_file() or (candidate / "adapter_config.json").is_file():
            return candidate
    if path.suffix.lower() == ".gguf":
        return path
    raise ConfigError(f"{path}: neither a run directory (with model/) nor a model directory (config.json or "
                      "adapter_config.json)")


def load_merged(source: Path):
    """``(model, tokenizer)``; a peft adapter is merged into its base model."""
    from .models import is_peft_model, load_any_causal_lm, load_tokenizer

    model = load_any_causal_lm(str(source), torch.float32)
    if is_peft_model(model):
        model = model.merge_and_unload()
    return model.eval(), load_tokenizer(str(source))


def export_gguf(run_or_model_dir: str | Path, output: str | Path, dtype: str = "f16", *,
                tokenizer_pre: str | None = None, overwrite: bool = False) -> ExportResult:
    """Write the model of a run (or a model directory) to ``output`` as GGUF with weights in ``dtype``.

    ``tokenizer_pre`` names the pre-tokenizer type outright (else see ``gguf_metadata.tokenizer_pre``); an
    existing ``output`` is refused unless ``overwrite``."""
    if dtype not in DTYPES:
        raise ConfigError(f"--dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    if Path(output).exists() and not overwrite:
        raise ConfigError(f"{output} already exists: choose another --output, or pass --overwrite to replace it")
    source = model_source(run_or_model_dir)
    model, tokenizer = load_merged(source)
    arch = gguf_architecture(model.config)
    import gguf

    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    partial = output.with_name(output.name + ".partial")     # a failed export leaves no half-written file
    writer = gguf.GGUFWriter(str(partial), arch)
    try:
        write_hyperparameters(writer, model.config, dtype)
        write_general(writer, model.config, export_name(source), sum(p.numel() for p in model.parameters()))
        write_tokenizer(writer, tokenizer, model.config, tokenizer_pre)
        count, fallback = write_tensors(writer, model, arch, dtype)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        os.replace(partial, output)
    finally:
        partial.unlink(missing_ok=True)
    return ExportResult(output, arch, dtype, count, fallback)


def gguf_architecture(config) -> str:
    model_type = getattr(config, "model_type", None)
    if model_type not in ARCHITECTURES:
        raise ConfigError(f"GGUF export supports the Llama family (model types {', '.join(ARCHITECTURES)}); "
                          f"this model is '{model_type}'")
    rope = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    if rope.get("rope_type", "default") != "default":
        raise ConfigError(f"GGUF export: rope scaling '{rope.get('rope_type')}' is not supported yet")
    return ARCHITECTURES[model_type]


def head_dim(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def rope_theta(config) -> float:
    rope = getattr(config, "rope_parameters", None) or {}
    return float(rope.get("rope_theta", getattr(config, "rope_theta", 10000.0)))


def export_name(source: Path) -> str:
    """The model's name when no imported GGUF gave one: the run's folder for ``run/model``, else the folder."""
    source = source.resolve()
    return source.parent.name if source.name == "model" else source.name


def write_hyperparameters(writer, config, dtype: str) -> None:
    import gguf

    writer.add_file_type({"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                          "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[dtype])
    if dtype == "q8_0":
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(getattr(config, "num_key_value_heads", None) or config.num_attention_heads)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_rope_freq_base(rope_theta(config))
    writer.add_rope_dimension_count(head_dim(config))
    if head_dim(config) != config.hidden_size // config.num_attention_heads:
        writer.add_key_length(head_dim(config))
        writer.add_value_length(head_dim(config))
    writer.add_vocab_size(config.vocab_size)


def write_tokenizer(writer, tokenizer, config, pre: str | None = None) -> None:
    """Tokens, scores and types, merges, special-token ids, BOS handling and the chat template."""
    import gguf

    with tempfile.TemporaryDirectory() as tmp:
        tokenizer.save_pretrained(tmp)
        vocab = _vocab(Path(tmp))
        tokens, scores, types = (list(column) for column in zip(*vocab.all_tokens()))
        if len(tokens) > config.vocab_size:
            raise ConfigError(f"the tokenizer has {len(tokens)} tokens, more than the model's {config.vocab_size}")
        for token_id, added in tokenizer.added_tokens_decoder.items():
            if token_id < len(types):
                types[token_id] = gguf.TokenType.CONTROL if added.special else gguf.TokenType.USER_DEFINED
        for extra in range(len(tokens), config.vocab_size):     # embedding rows no token uses
            tokens.append(f"[PAD{extra}]".encode())
            scores.append(-1000.0)
            types.append(gguf.TokenType.UNUSED)
        writer.add_tokenizer_model(vocab.tokenizer_model)
        writer.add_tokenizer_pre(tokenizer_pre(tokenizer, config, pre))
        writer.add_token_list(tokens)
        writer.add_token_scores(scores)
        writer.add_token_types(types)
        special = gguf.SpecialVocab(tmp, load_merges=vocab.tokenizer_model == "gpt2", n_vocab=len(tokens))
        special.add_to_gguf(writer, quiet=True)
        if "bos" not in special.add_special_token:      # say it explicitly: runtimes default to adding BOS
            writer.add_add_bos_token(_adds_bos(tokenizer))


def _vocab(tokenizer_dir: Path):
    import gguf

    for kind in (gguf.BpeVocab, gguf.LlamaHfVocab):
        try:
            return kind(tokenizer_dir)
        except FileNotFoundError:
            continue
    raise ConfigError("GGUF export supports byte-level BPE (GPT-2 style) and SentencePiece-style (Llama) "
                      "tokenizers saved as tokenizer.json; this tokenizer is neither")


def _adds_bos(tokenizer) -> bool:
    ids = tokenizer("a").input_ids
    return tokenizer.bos_token_id is not None and bool(ids) and ids[0] == tokenizer.bos_token_id


def interleave_rotary_rows(weight: torch.Tensor, heads: int) -> torch.Tensor:
    """Reorder a query/key projection's output rows from rotate-half pairing (i, i + d/2) to adjacent
    pairing (2i, 2i + 1), per head."""
    rows, *rest = weight.shape
    return weight.reshape(heads, 2, rows // heads // 2, *rest).transpose(1, 2).reshape(weight.shape)


def write_tensors(writer, model, arch: str, dtype: str) -> tuple[int, list[str]]:
    """Every weight under its GGUF name (``blk.N.attn_q.weight``...); returns the count and the f16 fallbacks."""
    import gguf

    config = model.config
    arch_id = next(key for key, value in gguf.MODEL_ARCH_NAMES.items() if value == arch)
    names = gguf.TensorNameMap(arch_id, config.num_hidden_layers)
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    tied = bool(getattr(config, "tie_word_embeddings", False))
    fallback, count = [], 0
    for hf_name, tensor in model.state_dict().items():
        if tied and hf_name == "lm_head.weight":
            continue
        name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise ConfigError(f"GGUF export: no GGUF name for tensor '{hf_name}'")
        tensor = tensor.detach().to(torch.float32)
        if hf_name.endswith(("q_proj.weight", "q_proj.bias")):
            tensor = interleave_rotary_rows(tensor, heads)
        elif hf_name.endswith(("k_proj.weight", "k_proj.bias")):
            tensor = interleave_rotary_rows(tensor, kv_heads)
        data, kind = encode(tensor.numpy(), dtype)
        if dtype == "q8_0" and kind != gguf.GGMLQuantizationType.Q8_0 and tensor.dim() == 2:
            fallback.append(name)
        writer.add_tensor(name, data, raw_dtype=kind)
        count += 1
    return count, fallback


def encode(array: np.ndarray, dtype: str):
    """``(data, GGML type)``: 1-D tensors stay f32; q8_0 needs rows divisible by 32, else f16."""
    import gguf

    kinds = gguf.GGMLQuantizationType
    if array.ndim < 2 or dtype == "f32":
        return array.astype(np.float32), kinds.F32
    if dtype == "q8_0" and array.shape[-1] % Q8_BLOCK == 0:
        return gguf.quants.quantize(array, kinds.Q8_0), kinds.Q8_0
    return array.astype(np.float16), kinds.F16
