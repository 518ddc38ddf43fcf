"""``preftune export gguf``: a trained model as a GGUF file for llama.cpp-family runtimes."""

from __future__ import annotations

from rich.console import Console

out = Console()


def gguf_arguments(gguf) -> None:
    gguf.add_argument("model", metavar="RUN_OR_MODEL_DIR", help="A run directory (with model/) or a model directory.")
    gguf.add_argument("--output", required=True, help="The .gguf file to write.")
    gguf.add_argument("--dtype", default="f16", choices=("f16", "f32", "q8_0"),
                      help="Weight type of the 2-D tensors (norms stay f32; q8_0 falls back to f16 where a row "
                           "is not a multiple of 32).")
    gguf.add_argument("--tokenizer_pre", default=None, metavar="TYPE",
                      help="The pre-tokenizer type llama.cpp should use (tokenizer.ggml.pre, e.g. llama-bpe, smollm). "
                           "By default: the one of the GGUF the model was imported from, else the one recognised "
                           "from the tokenizer's behaviour, else 'default' with a warning.")
    gguf.add_argument("--overwrite", action="store_true", help="Replace --output if it exists (refused otherwise).")


def run_export_gguf(args) -> int:
    from ..export_gguf import export_gguf

    result = export_gguf(args.model, args.output, dtype=args.dtype, tokenizer_pre=args.tokenizer_pre,
                         overwrite=args.overwrite)
    out.print(f"[green]written[/]: {result.path} ({result.architecture}, {result.tensors} tensors, {result.dtype})")
    if result.fallback_f16:
        out.print(f"{len(result.fallback_f16)} tensor(s) written as f16 (rows not divisible by 32 for q8_0)")
    return 0
