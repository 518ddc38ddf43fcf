"""The CPU allocator set-up of a training run: freed large tensors are reused, not page-faulted anew."""

import os
import platform
import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc",
                                reason="glibc only")

PROBE = """
import resource, torch
from preftune.speed.allocator import reuse_freed_memory
print(reuse_freed_memory())
faults = []
for _ in range(6):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    t = torch.empty(64 * 2**20 // 4)
    t.fill_(1.0)
    del t
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(min(faults[1:]))   # the first allocation always faults its pages in
"""


def page_faults(switch: str) -> tuple[bool, int]:
    env = dict(os.environ, PREFTUNE_REUSE_FREED_MEMORY=switch)
    out = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, env=env, check=True)
    applied, faults = out.stdout.split()
    return applied == "True", int(faults)


def test_a_freed_64_mib_tensor_is_reused_without_page_faults_unless_switched_off():
    pages = 64 * 2**20 // 4096
    applied, faults = page_faults("1")
    assert applied and faults < pages // 20            # reused: a few faults at most
    applied, faults = page_faults("0")
    assert not applied and faults >= pages * 0.9        # glibc's default: every page faulted in every time


def test_trimming_during_the_forward_pass_is_opt_in_and_changes_no_number(monkeypatch, tiny_tokenizer):
    import torch

    from preftune.speed import allocator
    from preftune.toy import build_tiny_llama

    torch.manual_seed(0)
    model = build_tiny_llama(tiny_tokenizer)
    layers = model.config.num_hidden_layers
    ids = torch.randint(0, len(tiny_tokenizer), (2, 12))
    before = model(ids).logits.detach()
    monkeypatch.delenv(allocator.TRIM_SWITCH, raising=False)
    assert allocator.trim_during_forward(model, torch.device("cpu")) == 0            # off by default
    monkeypatch.setenv(allocator.TRIM_SWITCH, "1")
    assert allocator.trim_during_forward(model, torch.device("cuda")) == 0           # CPU runs only
    trims = []
    monkeypatch.setattr(allocator, "_glibc", lambda: type("C", (), {"malloc_trim": staticmethod(trims.append)}))
    wrapped = torch.nn.ModuleDict({"policy": model})                                 # as the loop gets it
    assert allocator.trim_during_forward(wrapped, torch.device("cpu")) == layers
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, before, rtol=0, atol=0)
    assert trims == []                                                               # no trimming without gradients
    model(ids).logits.sum().backward()
    assert trims == [0] * layers                                                     # malloc_trim(0) after each layer
    monkeypatch.setenv(allocator.TRIM_SWITCH, "ten")
    with pytest.raises(ValueError, match="whole number"):
        allocator.trim_interval()


def test_reuse_is_not_set_while_trimming():
    env = dict(os.environ, PREFTUNE_REUSE_FREED_MEMORY="1", PREFTUNE_TRIM_FREED_MEMORY="5")
    probe = "from preftune.speed.allocator import reuse_freed_memory; print(reuse_freed_memory())"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, env=env, check=True)
    assert out.stdout.split() == ["False"]
