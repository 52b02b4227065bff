"""python -m clip_us.reproduce TABLE: every run a table needs, from one command.

    python -m clip_us.reproduce table2 --data-root data --dry-run        # the plan, one command a line
    python -m clip_us.reproduce table2 --data-root data                  # run it here, then the table
    python -m clip_us.reproduce table3 --data-root data --emit slurm t3.sh   # a Slurm array job
    python -m clip_us.reproduce table2 --datasets phantom --arch tiny --weights none --seeds 1 \\
        --epochs 2 --out runs/smoke                                      # minutes on a CPU

The plan (clip_us/reproduce/__init__.py) comes from the rows written once there; the sweep
(sweep.py) skips finished runs and resumes killed ones, so the same command goes on where a
killed sweep stopped; the table is rendered by clip_us.tables into OUT/<table>.md.
"""
from __future__ import annotations

import sys
from pathlib import Path

from ..config import command_line, fail, on_interrupt, parse_config, report_errors
from ..fileio import write_text
from ..tables import render_sweep
from . import CAPTION_SOURCE, DATA, ECHOCARE_SOURCE, ReproduceConfig, plan
from .slurm import slurm_script, stages
from .sweep import Sweep


def _source(path: Path) -> str:
    """Where the data a missing path stands for comes from."""
    if path.name in DATA:
        return DATA[path.name].source
    return ECHOCARE_SOURCE if path.parent.name == "echocare" else CAPTION_SOURCE


def _made_here(path: str, jobs) -> bool:
    return any(Path(path).is_relative_to(job.out_dir) for job in jobs)


def missing_data(jobs) -> list[str]:
    """Each --data-root folder and --manifest file the plan reads that is not there, once, with
    where to get it; and each --checkpoint no planned run makes (LN-2's, of an earlier sweep)."""
    wanted, lines = {}, []
    for job in jobs:
        for flag, value in zip(job.args, job.args[1:]):
            if flag in ("--data-root", "--manifest"):
                wanted[Path(value)] = flag == "--data-root"
            if flag == "--checkpoint" and not _made_here(value, jobs) and not Path(value).is_file():
                lines.append(f"  {value}: missing; {job.row} on {job.dataset} evaluates it: run "
                             f"its training data set in this sweep too")
    return [f"  {p}: missing; {_source(p)}" for p, folder in wanted.items()
            if not (p.is_dir() if folder else p.is_file())] + lines


def emit(cfg, jobs) -> None:
    kind, path = cfg.emit
    if kind != "slurm":
        raise ValueError(f"--emit {kind}: the one scheduler written is slurm (--emit slurm FILE)")
    text = slurm_script(jobs, cfg.table, cfg.nproc_per_node, str(Path(cfg.out) / "logs"),
                        command_line(), Path(path).name)
    write_text(path, text)
    print(f"wrote {path}: {len(jobs)} runs in {max(stages(jobs), default=-1) + 1} stages; "
          f"submit it with: bash {path}")


def main(argv=None) -> None:
    cfg = parse_config(ReproduceConfig, argv, description=ReproduceConfig.__doc__,
                       prog="python -m clip_us.reproduce")
    report_errors(cfg.debug)  # a bad --rows or --datasets: one line, exit status 2
    if cfg.dry_run and cfg.emit:
        raise ValueError("--dry-run prints the plan and --emit writes it: give one of them")
    jobs, notes = plan(cfg)
    if cfg.dry_run:  # commands on stdout, notes on stderr: stdout alone is a shell script
        print("\n".join(f"# {n}" for n in notes), file=sys.stderr)
        print("\n".join(job.command(cfg.nproc_per_node) for job in jobs))
        return
    if cfg.emit:
        return emit(cfg, jobs)
    missing = missing_data(jobs)
    if missing:
        fail("data missing, nothing run:\n" + "\n".join(missing) + "\nput it there, or leave its "
             "data set out with --datasets")
    for note in notes:
        print(f"note: {note}")
    sweep = Sweep(jobs, Path(cfg.out) / "logs", cfg.nproc_per_node)
    on_interrupt(lambda: "\n".join(sweep.summary()) + f"\nto go on: {command_line()}")
    sweep.run()
    print("\n".join(sweep.summary()))
    out = Path(cfg.out) / f"{cfg.table}.md"
    write_text(out, render_sweep(cfg.out, cfg.table, jobs))
    print(f"table: {out}")
    sys.exit(1 if sweep.failed else 0)


if __name__ == "__main__":
    main()
