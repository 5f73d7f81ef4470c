"""Run a function in ``N`` local processes joined by a gloo process group (the CPU tests of
`nsa_impl.parallel`), and collect what each rank returns.

`run_processes` spawns fresh interpreters (``torch.multiprocessing.spawn``), rendezvous through a
file in a temporary directory (no port to collide with a parallel test run), gives each process
one thread (the CI machine has two cores), and fails with the child's traceback, or after
``timeout`` seconds when a collective hangs. `skip_reason` says why a machine cannot run them.
`run_once` runs a spawn once per test session even when pytest-xdist's workers both ask for it
(the xdist recipe for session-wide fixtures: a file lock in the session's shared directory).
"""

from __future__ import annotations

import datetime
import fcntl
import os
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def skip_reason() -> str | None:
    """Why gloo process groups cannot run here (``None``: they can)."""
    if not dist.is_available():
        return "torch.distributed is not available in this torch build"
    if not dist.is_gloo_available():
        return "the gloo backend is not available in this torch build"
    return None


def run_processes(fn, world: int, *args, timeout: float = 120.0) -> list:
    """``[fn(rank, world, *args) for each rank]``, each rank in its own process.

    ``fn`` must be a module-level function (it is pickled by reference) and return picklable
    values (tensors on the CPU). The default process group (gloo) is initialised around it.
    """
    with tempfile.TemporaryDirectory() as tmp:
        ctx = mp.start_processes(_entry, args=(world, tmp, fn, args), nprocs=world, join=False,
                                 start_method="spawn")  # fmt: skip
        deadline = time.monotonic() + timeout
        while not ctx.join(timeout=0.5):
            if time.monotonic() > deadline:
                for p in ctx.processes:
                    if p.is_alive():
                        p.kill()
                raise TimeoutError(f"{fn.__name__} on {world} processes ran over {timeout} s")
        return [torch.load(os.path.join(tmp, f"rank{r}.pt"), weights_only=False)
                for r in range(world)]  # fmt: skip


def _entry(rank: int, world: int, tmp: str, fn, args) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{os.path.join(tmp, 'store')}",
                            rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=60))  # fmt: skip
    try:
        out = fn(rank, world, *args)
        torch.save(out, os.path.join(tmp, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def run_once(key: str, tmp_path_factory, fn, world: int, *args, timeout: float = 120.0) -> list:
    """`run_processes` of ``fn`` once per pytest session under the name ``key``: with
    pytest-xdist the first worker runs it and stores the results, the others load them."""
    if os.environ.get("PYTEST_XDIST_WORKER") is None:  # one process: nothing to share
        return run_processes(fn, world, *args, timeout=timeout)
    shared = Path(tmp_path_factory.getbasetemp()).parent  # the session's, for all workers
    result = shared / f"{key}.pt"
    with open(shared / f"{key}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            if not result.exists():
                torch.save(run_processes(fn, world, *args, timeout=timeout), result)
            return torch.load(result, weights_only=False)
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
