"""Running a plan on this machine, one run after another: a run whose results.json holds the same
config is skipped, a killed one (a last.pt, no results.json) goes on with --resume, a failed one
is reported and the rest go on (those that need it wait for the next sweep). Each run's console
goes to OUT/logs/<run>.log; one progress line per run goes to this console.
"""
from __future__ import annotations

import json
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from ..config import (
    NOT_A_SETTING,
    ClsConfig,
    ContrastiveConfig,
    EvaluateConfig,
    SupervisedConfig,
    ZeroShotConfig,
    given_fields,
    parse_config,
)
from ..runs import last_checkpoints
from . import Job

CONFIGS = {"train_seg.py": SupervisedConfig, "train_cls.py": ClsConfig,
           "zeroshot.py": ZeroShotConfig, "train_contrastive.py": ContrastiveConfig,
           "evaluate.py": EvaluateConfig}
RESUMABLE = ("train_seg.py", "train_cls.py", "train_contrastive.py")


# ----------------------------------------------------------------------------- a run's state
def _settings(cls, argv: list) -> dict:
    """The settings a command line gives, as the script parses them (NOT_A_SETTING left out)."""
    cfg = parse_config(cls, argv)
    return {k: getattr(cfg, k) for k in sorted(given_fields(cls, argv) - set(NOT_A_SETTING))}


def config_differences(job: Job, saved: dict) -> list[str]:
    """How the finished run's results.json (`saved`) differs from the planned run: the two
    command lines (its `argv`) parsed by the script's config and compared setting by setting;
    for a results.json without `argv`, the planned settings against its config."""
    cls = CONFIGS[job.script]
    planned = _settings(cls, [*job.args, "--out-dir", job.out_dir])
    if "argv" in saved:
        there = _settings(cls, saved["argv"])
    else:
        there = {k: (saved.get("config") or {}).get(k) for k in planned}
    return [f"{k}: {there.get(k, 'its default')!r} there, {planned.get(k, 'the default')!r} "
            f"planned" for k in sorted(set(planned) | set(there)) if there.get(k) != planned.get(k)]


def _finished(path: Path, job: Job) -> str:
    """'done', or 'conflict: ...' for one results.json of the job."""
    try:
        saved = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        return f"conflict: {path} cannot be read ({e}); move its folder away"
    diff = config_differences(job, saved)
    return "done" if not diff else (f"conflict: {path.parent} holds a finished run of another "
                                    f"config ({'; '.join(diff)}); pass another --out")


def state(job: Job) -> str:
    """done (every results.json of the job, for this config), resume (a killed run: last.pt, no
    results.json), new, or 'conflict: ...' (a finished run of another config in its folder)."""
    found = [Path(p) for p in job.results if Path(p).is_file()]
    if found:
        verdicts = [_finished(p, job) for p in found]
        bad = [v for v in verdicts if v != "done"]
        return bad[0] if bad else ("done" if len(found) == len(job.results) else "new")
    if job.script in RESUMABLE and last_checkpoints(Path(job.out_dir)):
        return "resume"
    return "new"


# ----------------------------------------------------------------------------- running one
def _launcher(job: Job, nproc: int, resume: bool) -> list[str]:
    """The command run here: this interpreter (and torch.distributed.run for torchrun)."""
    argv = job.argv(nproc, python=sys.executable)
    if argv[0] == "torchrun":
        argv[:1] = [sys.executable, "-m", "torch.distributed.run"]
    return argv + (["--resume"] if resume else [])


def run_job(job: Job, log: Path, nproc: int, resume: bool) -> int:
    """Run one job, its console appended to `log`; its exit status."""
    log.parent.mkdir(parents=True, exist_ok=True)
    argv = _launcher(job, nproc, resume)
    with open(log, "a", encoding="utf-8") as f:
        f.write(f"\n$ {' '.join(argv)}   # {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
        f.flush()
        proc = subprocess.Popen(argv, stdout=f, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        try:
            return proc.wait()
        except KeyboardInterrupt:  # the run got Ctrl-C too: let it save and say so
            proc.wait(timeout=120)
            raise


def last_line(log: Path) -> str:
    """A failed run's reason: the script's last one-line `error:`, else its log's last line."""
    try:
        lines = [ln.strip() for ln in log.read_text(encoding="utf-8", errors="replace")
                 .splitlines() if ln.strip()]
    except OSError:
        return ""
    errors = [ln for ln in lines if ln.startswith("error:")]
    return (errors or lines or [""])[-1][:300]


# ----------------------------------------------------------------------------- the sweep
def _minutes(seconds: float) -> str:
    return f"{seconds / 60:.1f} min" if seconds < 5400 else f"{seconds / 3600:.1f} h"


@dataclass
class Sweep:
    """A plan run here: what happened to each job, and the clock for the estimate."""
    jobs: list
    logs: Path
    nproc: int = 0
    outcome: dict = field(default_factory=dict)   # key -> ok / skipped / failed / blocked / conflict
    seconds: dict = field(default_factory=dict)   # row and script -> durations of runs made here
    started: float = field(default_factory=time.perf_counter)

    def log_of(self, job: Job) -> Path:
        return self.logs / (job.key.replace("/", "__") + ".log")

    def _expected(self, job: Job, mean: float) -> float:
        """A run's expected time: the mean of its row's runs so far (a row's seeds and data sets
        cost alike; DINOv2 at 518 px costs far more than a CLIP row), else its script's, else
        the mean of all."""
        for key in (job.row, job.script):
            if key in self.seconds:
                return sum(self.seconds[key]) / len(self.seconds[key])
        return mean

    def estimate(self, left: list) -> str:
        """About how long the jobs still to run take, from the runs made so far."""
        made = [s for k, v in self.seconds.items() if k.endswith(".py") for s in v]
        if not left:
            return "the last run"
        if not made:
            return "no estimate yet"
        total = sum(self._expected(j, sum(made) / len(made)) for j in left)
        return f"about {_minutes(total)} to go"

    def label(self, job: Job) -> str:
        seed = f" · seed {job.seed}" if job.seed is not None else ""
        return f"{job.row} · {job.dataset}{seed}"

    def run(self) -> None:
        """Every job not finished before, in plan order; Ctrl-C stops after the current run has
        saved what it can (it gets the signal too)."""
        states = {j.key: state(j) for j in self.jobs}
        for key, s in states.items():
            if s == "done" or s.startswith("conflict"):
                self.outcome[key] = "skipped" if s == "done" else s
        todo = [j for j in self.jobs if states[j.key] in ("new", "resume")]
        print(f"{len(self.jobs)} runs: {len(self.jobs) - len(todo)} finished before or in "
              f"conflict, {sum(s == 'resume' for s in states.values())} to resume, "
              f"{sum(s == 'new' for s in states.values())} to start; logs in {self.logs}",
              flush=True)
        for i, job in enumerate(todo):
            self.one(f"[{i + 1}/{len(todo)}]", job, states[job.key] == "resume", todo[i + 1:])

    def one(self, counter: str, job: Job, resume: bool, left: list) -> None:
        """One job, unless a job it needs did not finish; its progress line."""
        blocked = [k for k in job.needs if self.outcome.get(k) not in ("ok", "skipped")]
        if blocked:
            self.outcome[job.key] = "blocked"
            print(f"{counter} {self.label(job)}: not run, it needs {', '.join(blocked)}", flush=True)
            return
        print(f"{counter} {self.label(job)}{' (resumed)' if resume else ''} ...", end="", flush=True)
        t0 = time.perf_counter()
        code = run_job(job, self.log_of(job), self.nproc, resume)
        took = time.perf_counter() - t0
        for key in (job.row, job.script):
            self.seconds.setdefault(key, []).append(took)
        ok = code == 0 and all(Path(p).is_file() for p in job.results)
        self.outcome[job.key] = "ok" if ok else "failed"
        status = "ok" if ok else f"FAILED (exit {code})"
        print(f" {status} in {_minutes(took)} · sweep {_minutes(time.perf_counter() - self.started)}"
              f", {self.estimate(left)}", flush=True)

    def summary(self) -> list[str]:
        """What ran, what was skipped, and for each failure its error line and log."""
        count = lambda what: sum(v == what for v in self.outcome.values())  # noqa: E731
        conflicts = {k: v for k, v in self.outcome.items() if v.startswith("conflict")}
        lines = [f"sweep: {count('ok')} ran, {count('skipped')} skipped (finished before), "
                 f"{count('failed')} failed, {count('blocked')} not run (a run they need did not "
                 f"finish), {len(conflicts)} in conflict; "
                 f"{_minutes(time.perf_counter() - self.started)}"]
        by_key = {j.key: j for j in self.jobs}
        for key, what in self.outcome.items():
            if what == "failed":
                log = self.log_of(by_key[key])
                lines.append(f"  FAILED {self.label(by_key[key])}: {last_line(log)}\n"
                             f"         log: {log}")
        lines += [f"  CONFLICT {self.label(by_key[k])}: {v.removeprefix('conflict: ')}"
                  for k, v in conflicts.items()]
        return lines

    @property
    def failed(self) -> bool:
        return any(v != "ok" and v != "skipped" for v in self.outcome.values())
