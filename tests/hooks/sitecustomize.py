"""Test-only crash hook for the preftune processes the tests start: with ``KILL_AT_STEP=N`` in the environment,
the process SIGKILLs itself right after training step N (nothing of step N is logged or saved), so that resume
can be tested against a real crash. tests/conftest.py puts this directory on every subprocess's PYTHONPATH;
without the variable nothing is imported or changed."""

import os

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
