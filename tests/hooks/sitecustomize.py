"""Test-only hooks for the preftune processes the tests start (tests/conftest.py puts this directory on every
subprocess's PYTHONPATH; without the variables below nothing is imported or changed):

* ``KILL_AT_STEP=N``: the process SIGKILLs itself right after training step N (nothing of step N is logged or
  saved), so that resume can be tested against a real crash;
* ``TESTS_PIN_CPU_BF16=0``: precision ``auto`` resolves as on a CPU without fast bf16 (fp32), as in-process.
"""

import importlib.abc
import importlib.util
import os
import sys

if os.environ.get("TESTS_PIN_CPU_BF16") == "0":

    class _PinCpuBf16(importlib.abc.MetaPathFinder):
        """Sets ``preftune.models.CPU_BF16_OVERRIDE = False`` as soon as that module is imported (not before:
        importing it here would load torch into every process)."""

        def find_spec(self, name, path, target=None):
            if name != "preftune.models":
                return None
            sys.meta_path.remove(self)
            spec = importlib.util.find_spec(name)
            run = spec.loader.exec_module

            def exec_module(module):
                run(module)
                module.CPU_BF16_OVERRIDE = False

            spec.loader.exec_module = exec_module
            return spec

    sys.meta_path.insert(0, _PinCpuBf16())

_kill_at = int(os.environ.get("KILL_AT_STEP", "0") or "0")

if _kill_at > 0:
    import signal

    from preftune.runtime import loop

    _init = loop.Trainer.__init__

    def _init_with_crash(self, *args, **kwargs):
        _init(self, *args, **kwargs)
        run = self.step.run

        def run_then_maybe_crash(trainer, step):
            out = run(trainer, step)
            if step + 1 == _kill_at:
                os.kill(os.getpid(), signal.SIGKILL)
            return out

        self.step.run = run_then_maybe_crash

    loop.Trainer.__init__ = _init_with_crash
