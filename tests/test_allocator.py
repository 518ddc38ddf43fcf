"""The CPU allocator set-up of a training run: freed large tensors are reused, not page-faulted anew, for the
duration of the run only; opt-in trimming changes no number."""

import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(__import__("platform").system() != "Linux"
                                or __import__("platform").libc_ver()[0] != "glibc", reason="glibc only")

PROBE = """
import resource, sys, torch
from types import SimpleNamespace
from preftune.speed.allocator import restore_defaults, reuse_freed_memory

def faults():
    counts = []
    for _ in range(6):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        t = torch.empty(64 * 2**20 // 4)
        t.fill_(1.0)
        del t
        counts.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    return min(counts[1:])   # the first allocation always faults its pages in

reuse, trim = sys.argv[1] == "1", int(sys.argv[2])
print(faults())                                            # glibc's default, before any run
print(reuse_freed_memory(SimpleNamespace(reuse_freed_memory=reuse, trim_freed_memory=trim), "cpu"))
print(faults())                                            # during the run
kept = int(open("/proc/self/statm").read().split()[1])     # resident pages, the freed 64 MiB kept
restore_defaults()
print((kept - int(open("/proc/self/statm").read().split()[1])) * 4096 // 2**20)   # MiB returned at the run's end
"""


def probe(reuse: bool, trim: int = 0) -> tuple[int, bool, int, int]:
    out = subprocess.run([sys.executable, "-c", PROBE, "1" if reuse else "0", str(trim)], capture_output=True,
                         text=True, check=True)
    before, applied, during, returned = out.stdout.split()
    return int(before), applied == "True", int(during), int(returned)


PAGES = 64 * 2**20 // 4096


def test_a_freed_64_mib_tensor_is_reused_during_the_run_only():
    before, applied, during, returned = probe(reuse=True)
    assert before >= PAGES * 0.9                       # glibc's default: every page faulted in every time
    assert applied and during < PAGES // 20            # reused: a few faults at most
    assert returned >= 48                              # the run's end gives the kept 64 MiB back to the system


def test_reuse_is_not_set_when_switched_off_or_while_trimming():
    for reuse, trim in ((False, 0), (True, 5)):
        _, applied, during, _ = probe(reuse, trim)
        assert not applied and during >= PAGES * 0.9


def test_trimming_during_the_forward_pass_is_opt_in_and_changes_no_number(monkeypatch, tiny_tokenizer):
    import torch

    from preftune.speed import allocator
    from preftune.toy import build_tiny_llama

    torch.manual_seed(0)
    model = build_tiny_llama(tiny_tokenizer)
    layers = model.config.num_hidden_layers
    ids = torch.randint(0, len(tiny_tokenizer), (2, 12))
    before = model(ids).logits.detach()
    assert allocator.trim_during_forward(model, 0) == 0                              # off by default
    trims = []
    monkeypatch.setattr(allocator, "_glibc", lambda: type("C", (), {"malloc_trim": staticmethod(trims.append)}))
    wrapped = torch.nn.ModuleDict({"policy": model})                                 # as the loop gets it
    assert allocator.trim_during_forward(wrapped, 1) == layers
    assert allocator.trim_during_forward(wrapped, 1) == layers                       # prepared twice: one hook
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, before, rtol=0, atol=0)
    assert trims == []                                                               # no trimming without gradients
    model(ids).logits.sum().backward()
    assert trims == [0] * layers                                                     # malloc_trim(0) after each layer
