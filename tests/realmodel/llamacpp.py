"""llama.cpp itself, for the tests that check an exported GGUF in the runtime it is written for.

The CPU extension module of the ``llama-cpp-cffi`` wheel (``preftune.realmodel.LLAMA_CPP_CPU``) is loaded
directly and driven through llama.cpp's C API (load, tokenize, decode, logits); the wheel's own Python layer
is not used (it pins older transformers). Needs the ``cffi`` package (the ``test`` extra).
"""

from __future__ import annotations

import importlib.util

import numpy as np


class RuntimeUnusable(Exception):
    """The runtime was obtained but cannot run here (a missing library, an older C runtime)."""


def load_module(path):
    """The cffi module (``lib``, ``ffi``) of the extension file at ``path``."""
    try:
        spec = importlib.util.spec_from_file_location("_llama_cpp_cpu", str(path))
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    except ImportError as exc:
        raise RuntimeUnusable(f"{path.name} cannot be loaded here: {exc}") from None
    lib, ffi = module.lib, module.ffi

    @ffi.def_extern()
    def llama_cpp_cffi_ggml_log_callback(level, text, user_data):    # quiet: llama.cpp logs every load
        return None

    lib.llama_backend_init()
    lib.llama_log_set(lib.llama_cpp_cffi_ggml_log_callback, ffi.NULL)
    return module


class LlamaCppModel:
    """One GGUF file loaded in llama.cpp on the CPU, with one context of ``n_ctx`` tokens."""

    def __init__(self, module, gguf_path, n_ctx: int = 512):
        self.lib, self.ffi = module.lib, module.ffi
        params = self.lib.llama_model_default_params()
        params.n_gpu_layers = 0
        self.model = self.lib.llama_load_model_from_file(str(gguf_path).encode(), params)
        if self.model == self.ffi.NULL:
            raise RuntimeUnusable(f"llama.cpp could not load {gguf_path}")
        self.n_ctx = n_ctx
        self.n_vocab = self.lib.llama_n_vocab(self.model)

    def tokenize(self, text: str, parse_special: bool = True) -> list[int]:
        """Token ids as llama.cpp splits ``text``, without a BOS (as a chat-template render is fed)."""
        data = text.encode()
        capacity = len(data) + 8
        buffer = self.ffi.new("llama_token[]", capacity)
        count = self.lib.llama_tokenize(self.model, data, len(data), buffer, capacity, False, parse_special)
        assert count >= 0, f"llama_tokenize needed {-count} slots"
        return list(buffer[0:count])

    def greedy(self, prompt_ids: list[int], new_tokens: int) -> list[int]:
        """The ``new_tokens`` argmax continuations of ``prompt_ids`` (a fresh context each call)."""
        params = self.lib.llama_context_default_params()
        params.n_ctx = params.n_batch = self.n_ctx
        params.n_threads = params.n_threads_batch = 1
        context = self.lib.llama_new_context_with_model(self.model, params)
        try:
            out, feed = [], list(prompt_ids)
            for _ in range(new_tokens):
                ids = self.ffi.new("llama_token[]", feed)
                assert self.lib.llama_decode(context, self.lib.llama_batch_get_one(ids, len(feed))) == 0
                logits = self.ffi.buffer(self.lib.llama_get_logits_ith(context, -1), self.n_vocab * 4)
                feed = [int(np.frombuffer(logits, dtype=np.float32).argmax())]
                out.append(feed[0])
            return out
        finally:
            self.lib.llama_free(context)

    def close(self):
        self.lib.llama_free_model(self.model)
