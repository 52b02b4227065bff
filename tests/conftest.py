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
