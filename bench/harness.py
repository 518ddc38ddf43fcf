"""What every benchmark script here shares: the hidden worker mode (each trainer runs in its own
process), TRL from a cache directory, the results table and the comparison with TRL."""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path


def add_model_arguments(parser: argparse.ArgumentParser, lr: float) -> None:
    """The shape of the Llama both trainers get, and their learning rate."""
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--lr", type=float, default=lr)


def add_worker_arguments(parser: argparse.ArgumentParser) -> None:
    """``--json`` for the report, and the hidden options a script passes to its own worker processes."""
    parser.add_argument("--json", help="also write the results here")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--assets", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)


def run_worker(args, workers: dict, threads: int | None = None) -> bool:
    """In a worker process: run ``workers[args.worker]``, write its result to ``OUT/bench.json`` and return True."""
    if not args.worker:
        return False
    if threads is not None:
        import torch

        torch.set_num_threads(threads)
    assets = json.loads(Path(args.assets).read_text())
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    result = workers[args.worker](args, assets, out)
    (out / "bench.json").write_text(json.dumps(result))
    return True


def results_table(title: str, results: dict[str, dict], columns: list[str], fmt=lambda column, value: f"{value:.2f}"):
    """A rich table: one row per trainer, one column per figure."""
    from rich.table import Table

    table = Table(title=title)
    table.add_column("trainer")
    for column in columns:
        table.add_column(column, justify="right")
    for name, figures in results.items():
        table.add_row(name, *(fmt(column, figures[column]) for column in columns))
    return table


def trl_in_cache(version: str, probe: str, marker: str) -> str | None:
    """A directory to put first on the TRL worker's path, or None when the Python code ``probe`` runs here (the
    installed TRL serves). TRL ``version`` is pip-installed there once, without dependencies, unless ``marker``
    (a folder below it) is already there."""
    if subprocess.run([sys.executable, "-c", probe], capture_output=True).returncode == 0:
        return None
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
    target = cache / "preftune" / "bench" / f"trl-{version}"
    if not (target / marker).is_dir():
        subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--target", str(target),
                        f"trl=={version}"], check=True)
    return str(target)


def spawn_worker(script: str, name: str, args, keys: list[str], assets_file: Path, root: Path) -> dict:
    """Run worker ``name`` of ``script`` in a fresh process with ``args``' ``keys`` and ``args.threads`` threads
    (TRL workers get ``args.trl_path`` first on their path); its result."""
    out = root / f"out-{name}"
    cmd = [sys.executable, script, "--worker", name, "--assets", str(assets_file), "--out", str(out)]
    for key in keys:
        cmd += [f"--{key}", str(getattr(args, key))]
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads))
    if name.startswith("trl") and args.trl_path:
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [args.trl_path, env.get("PYTHONPATH")]))
    done = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if done.returncode != 0:
        sys.stderr.write(done.stdout[-4000:] + done.stderr[-4000:])
        raise SystemExit(f"worker {name} failed")
    return json.loads((out / "bench.json").read_text())


def report_against_trl(console, args, results: dict[str, dict], title: str, columns: list[str], fmt) -> None:
    """Print the results table (:func:`results_table`) and preftune's speed, CPU time and memory relative to TRL's;
    write the report to ``args.json`` if given."""
    console.print(results_table(title, results, columns, fmt))
    report = {"config": {k: v for k, v in vars(args).items() if k not in ("worker", "assets", "out")},
              "results": results}
    if "preftune" in results and "trl" in results:
        ours, theirs = results["preftune"], results["trl"]
        ratio = {"speed": ours["samples/s"] / theirs["samples/s"], "memory": ours["peak MiB"] / theirs["peak MiB"],
                 "cpu": ours["CPU s / iteration"] / theirs["CPU s / iteration"]}
        report["preftune vs trl"] = ratio
        console.print(f"preftune vs TRL: {ratio['speed']:.2f}x samples/s, {ratio['cpu']:.2f}x CPU time per iteration, "
                      f"{ratio['memory']:.2f}x peak memory")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))


def online_parser(doc: str, lr: float, runs: list[str], shape: dict[str, tuple[int, str]]) -> argparse.ArgumentParser:
    """The options of the online RL benchmarks (PPO, GRPO): shared ones and the script's own batch ``shape``
    (``{"--option": (default, help)}``, integers)."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--iterations", type=int, default=5)
    for flag, (default, text) in shape.items():
        parser.add_argument(flag, type=int, default=default, help=text)
    parser.add_argument("--micro", type=int, default=8, help="sequences per forward/backward pass")
    parser.add_argument("--prompt-length", type=int, default=64)
    add_model_arguments(parser, lr=lr)
    parser.add_argument("--threads", type=int, default=1, help="torch threads per worker process")
    parser.add_argument("--runs", nargs="*", default=runs)
    add_worker_arguments(parser)
    return parser


def iteration_medians(result: dict) -> tuple[float, float]:
    """Median wall and CPU seconds per iteration, the first (warm-up) iteration left out."""
    wall = statistics.median(result["iteration_times"][1:] or result["iteration_times"])
    cpu = statistics.median(result["iteration_cpu"][1:] or result["iteration_cpu"])
    return wall, cpu


def _now() -> tuple[float, float]:
    return time.perf_counter(), time.process_time()


def preftune_stamps() -> list[tuple[float, float]]:
    """Wall and CPU time at the end of every preftune iteration (with ``logging_steps=1`` the trainer logs once
    an iteration), appended while training runs."""
    from preftune.runtime import loop

    stamps: list[tuple[float, float]] = []
    original_log = loop.Trainer.log

    def timed_log(self, metrics):
        stamps.append(_now())
        original_log(self, metrics)

    loop.Trainer.log = timed_log
    return stamps


def trl_timer(stamps: list[tuple[float, float]]):
    """A TRL/transformers callback appending wall and CPU time to ``stamps`` at the end of every step."""
    from transformers import TrainerCallback

    class IterationTimer(TrainerCallback):
        def on_step_end(self, *a, **k):
            stamps.append(_now())

    return IterationTimer()


class Measure:
    """Peak memory from now on (loading included); then :meth:`train` times the training itself."""

    def __init__(self, stamps: list[tuple[float, float]]):
        self.stamps = stamps
        self.meter = PeakRSS()
        self.meter.start()

    def train(self, run) -> dict:
        """Call ``run()``; the time of each iteration (wall and CPU), the peak memory and the total time."""
        started = _now()
        run()
        total = time.perf_counter() - started[0]
        peak = self.meter.stop()
        points = [started] + self.stamps
        return {"iteration_times": [b[0] - a[0] for a, b in zip(points, points[1:])],
                "iteration_cpu": [b[1] - a[1] for a, b in zip(points, points[1:])], "peak_mib": peak, "total_s": total}


def spawn_all(script: str, args, keys: list[str], assets: dict, root: Path, console) -> dict[str, dict]:
    """Each of ``args.runs`` run by :func:`spawn_worker` in turn, on the same assets; their results by name."""
    assets_file = root / "assets.json"
    assets_file.write_text(json.dumps(assets))
    results = {}
    for name in args.runs:
        console.print(f"running {name} ...")
        results[name] = spawn_worker(script, name, args, keys, assets_file, root)
    return results


def console():
    """The rich console the parent process reports on."""
    from rich.console import Console

    return Console()


class PeakRSS:
    """Samples this process's resident set size in a thread; peak above the baseline at start()."""

    def __init__(self, interval: float = 0.002):
        import psutil

        self.proc = psutil.Process()
        self.interval = interval
        self.peak = 0
        self.baseline = 0
        self._stop = threading.Event()

    def start(self):
        self.baseline = self.proc.memory_info().rss
        self.peak = self.baseline
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self.proc.memory_info().rss)
            time.sleep(self.interval)

    def stop(self) -> float:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.proc.memory_info().rss)
        return (self.peak - self.baseline) / 2**20
