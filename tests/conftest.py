import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# precision "auto" resolves by the CPU (bf16 where it has AMX-BF16 or AVX512-BF16): pin it to fp32 so that the
# tests compute the same on every machine; the bf16 tests (test_bf16.py) ask for bf16 explicitly.
os.environ["PREFTUNE_CPU_BF16"] = "0"


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models train fastest on one thread (several contend badly on a shared CPU)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def tiny_tokenizer():
    from preftune.toy import build_toy_tokenizer
    from toydata import toy_corpus

    return build_toy_tokenizer(toy_corpus())


@pytest.fixture()
def tiny_model(tiny_tokenizer):
    from preftune.toy import build_tiny_llama

    return build_tiny_llama(tiny_tokenizer)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tiny_tokenizer):
    """A tiny Llama and its tokenizer saved as an ordinary Hugging Face checkpoint directory."""
    from preftune.toy import build_tiny_llama

    path = tmp_path_factory.mktemp("tiny-llama")
    build_tiny_llama(tiny_tokenizer).save_pretrained(path)
    tiny_tokenizer.save_pretrained(path)
    return path
