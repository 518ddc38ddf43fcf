import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# the crash hook of the CLI processes tests start (KILL_AT_STEP=N; see hooks/sitecustomize.py)
_HOOKS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "hooks")
os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [_HOOKS, os.environ.get("PYTHONPATH")]))


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
