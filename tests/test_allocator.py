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
from preftune.train.allocator import reuse_freed_memory
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
