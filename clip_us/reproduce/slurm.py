"""--emit slurm FILE: the plan as a Slurm array job, one task per run, torchrun inside each.

The file is submitted with `bash FILE`: it then submits itself once per stage, as an array job
whose tasks are that stage's runs, each stage waiting for the one before (afterok). Stage 0 is
every run that needs none (the contrastive stage among them), stage 1 the runs that need one of
stage 0 (the ft. rows, LN-2's evaluations), stage 2 LN-2's evaluations of the ft. rows. Inside
a task, a run whose results.json files exist is skipped (without the sweep's config check: one
--out per setting) and a run with a last.pt is resumed, so resubmitting the file goes on.
"""
from __future__ import annotations

import os
import shlex

from . import Job


def stages(jobs: list[Job]) -> list[int]:
    """Each job's stage: 0 without needs, else one more than the latest stage it needs."""
    at = {}
    for job in jobs:  # the plan lists every job after the jobs it needs
        at[job.key] = 1 + max((at[k] for k in job.needs if k in at), default=-1)
    return [at[j.key] for j in jobs]


def _ranges(ids: list[int]) -> str:
    """Slurm's --array list: 0-3,7,9-10."""
    out, start = [], ids[0]
    for a, b in zip(ids, ids[1:] + [None]):
        if b != a + 1:
            out.append(f"{start}" if start == a else f"{start}-{a}")
            start = b
    return ",".join(out)


HEADER = """#!/bin/bash
#SBATCH --job-name=clip_us-{table}
#SBATCH --nodes=1
#SBATCH --ntasks=1
#SBATCH --gres=gpu:{nproc}
#SBATCH --cpus-per-task={cpus}
#SBATCH --output={logs}/slurm-%A_%a.log
# {n} runs of {table} in {k} stages, written by:
#   {origin}
# Submit with `bash {name}` (not sbatch): it submits one array job per stage, each waiting for
# the stage before (afterok: a failed run holds back the stages after it; fix it, resubmit).
# Add your cluster's partition, time and account to the #SBATCH lines above.
set -euo pipefail
cd {cwd}  # the folder the plan's paths are relative to
"""

TASK = """
if [ -z "${{SLURM_ARRAY_TASK_ID:-}}" ]; then  # submitting
  mkdir -p {logs}  # Slurm does not make the --output folder
  dependency=()
  for ids in "${{STAGES[@]}}"; do
    job=$(sbatch --parsable --array="$ids" ${{dependency[@]+"${{dependency[@]}}"}} "$0")
    echo "submitted array job $job: runs $ids"
    dependency=(--dependency="afterok:$job")
  done
  exit 0
fi
out="${{OUTS[$SLURM_ARRAY_TASK_ID]}}"
eval "results=(${{RESULTS[$SLURM_ARRAY_TASK_ID]}})"
finished=1
for f in "${{results[@]}}"; do [ -f "$f" ] || finished=0; done
if [ "$finished" = 1 ]; then echo "finished before: $out"; exit 0; fi
resume=""
if compgen -G "$out/last.pt" > /dev/null || compgen -G "$out/seed*/last.pt" > /dev/null; then
  resume="--resume"  # a killed or preempted run goes on
fi
eval "${{RUNS[$SLURM_ARRAY_TASK_ID]}} $resume"
"""


def _array(name: str, items: list[str]) -> str:
    """A bash array, one quoted item per line."""
    return f"{name}=(\n" + "\n".join(f"  {item}" for item in items) + "\n)\n"


def slurm_script(jobs: list[Job], table: str, nproc: int, logs: str, origin: str,
                 name: str) -> str:
    """The whole file: header, the runs, their run folders and results, the stages, the task."""
    nproc, at = max(nproc, 1), stages(jobs)
    k = max(at, default=-1) + 1
    runs = [f"{shlex.quote(j.command(nproc))}  # {i}: stage {s}"
            for i, (j, s) in enumerate(zip(jobs, at))]
    results = [shlex.quote(" ".join(map(shlex.quote, j.results))) for j in jobs]
    per_stage = [_ranges([i for i, s in enumerate(at) if s == stage]) for stage in range(k)]
    return (HEADER.format(table=table, nproc=nproc, cpus=8 * nproc, logs=logs, n=len(jobs), k=k,
                          origin=origin, name=name, cwd=shlex.quote(os.getcwd()))
            + _array("RUNS", runs) + _array("OUTS", [shlex.quote(j.out_dir) for j in jobs])
            + _array("RESULTS", results)
            + "STAGES=(" + " ".join(f'"{s}"' for s in per_stage) + ")\n"
            + TASK.format(logs=shlex.quote(logs)))
