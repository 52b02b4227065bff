"""Shared test fixtures."""
import os
import runpy
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models are latency-bound: on a shared 2-core machine, one thread is several times
    faster than two fighting other jobs. Restored afterwards for other test modules."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def run_script():
    """run(SCRIPT, ARGS, env): `python SCRIPT ARGS` as a user types it, but in this process
    (runpy), so the runs share one import of torch. `env` adds environment variables for the
    run; sys.argv and os.environ are restored afterwards. A script's error propagates."""
    def run(script, args, env=None):
        old_argv, old_env = sys.argv, dict(os.environ)
        sys.argv = [str(ROOT / script), *map(str, args)]
        os.environ.update({k: str(v) for k, v in (env or {}).items()})
        try:
            runpy.run_path(str(ROOT / script), run_name="__main__")
        finally:
            sys.argv = old_argv
            os.environ.clear()
            os.environ.update(old_env)
    return run


def _exit(status):
    raise SystemExit(status)


def exit_status(call) -> int:
    """The exit status of a process whose main is `call()`, run in this process: an exception
    it lets out goes through the sys.excepthook it installed (config.report_errors: one `error:`
    line, status 2; Ctrl-C: one `interrupted:` line, 130) with os._exit made a SystemExit, or,
    with none installed (--debug), through Python's own (a traceback, status 1)."""
    hook, real_exit = sys.excepthook, os._exit
    try:
        call()
        return 0
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else int(e.code is not None)
    except BaseException as e:  # noqa: BLE001 -- KeyboardInterrupt too, as a process sees it
        os._exit = _exit
        try:
            (sys.excepthook if sys.excepthook is not hook else sys.__excepthook__)(
                type(e), e, e.__traceback__)
        except SystemExit as done:
            return done.code
        return 1
    finally:
        sys.excepthook, os._exit = hook, real_exit
