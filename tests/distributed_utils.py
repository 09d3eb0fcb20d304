"""Multi-process test launcher over gloo (CPU).

`run_distributed(fn, world_size, *args, parallel=..., timeout=...)` spawns `world_size` fresh
processes, initialises torch.distributed (gloo) and, if asked, Megatron's model-parallel groups,
calls `fn(*args, **kwargs)` on every rank, and returns the list of per-rank results (any
torch.save-able object: dicts of tensors, floats...). A worker exception is re-raised in the
parent with the worker's traceback. Every configuration runs in its own processes because Megatron
keeps process-global singletons (MTP and MoE loggers, parallel state).

`fn` must be importable by the children: a module-level function, or "module:function".

On CPU the ranks are forked from a multiprocessing fork server that has imported torch and Megatron-Core
once (per test process) and nothing else: each rank starts as a fresh process would after those imports (no
process group, no parallel state, no seed), without paying ~5 s of imports per rank. A rank takes the
launching process's environment and working directory, as a spawned one does.
"""

from __future__ import annotations

import io
import multiprocessing as mp
import os
import queue
import socket
import time
import traceback
from collections.abc import Callable
from datetime import timedelta
from functools import cache
from typing import Any

import torch


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _resolve(fn: Callable | str) -> Callable:
    if callable(fn):
        return fn
    module_name, _, attr = fn.partition(":")
    module = __import__(module_name, fromlist=[attr])
    return getattr(module, attr)


def _to_bytes(obj: Any) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


# Imported by the fork server before it forks any rank: what every Megatron test imports anyway. Nothing
# here reads the environment at import time in a way a test sets (DeepSpeed does, DS_ACCELERATOR: it is
# left to the ranks); a module missing here (no megatron-core) is skipped by the server.
_PRELOAD = [
    "torch",
    "megatron.core.parallel_state",
    "megatron.core.models.gpt",
    "megatron.core.transformer.multi_token_prediction",
    "megatron.core.optimizer",
    "megatron.core.distributed",
    "megatron.core.pipeline_parallel",
    "megatron.core.dist_checkpointing",
    "megatron_cpu",
    "distributed_utils",
]


@cache
def _context() -> mp.context.BaseContext:
    # With CUDA the ranks are spawned: importing Megatron may initialise the driver in the fork server,
    # and a process forked after that cannot use CUDA.
    if torch.cuda.is_available():
        return mp.get_context("spawn")
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(_PRELOAD)
    return ctx


def _worker(
    environ: dict[str, str],
    cwd: str,
    rank: int,
    world_size: int,
    port: int,
    fn: Callable | str,
    args: tuple,
    kwargs: dict,
    parallel: dict | None,
    cpu_shims: bool,
    seed: int,
    results: mp.Queue,
) -> None:
    os.environ.clear()
    os.environ.update(environ)
    os.chdir(cwd)
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        WORLD_SIZE=str(world_size),
        LOCAL_RANK=str(rank),
    )
    # Two cores shared by up to four ranks: one intra-op thread each avoids oversubscription.
    torch.set_num_threads(1)
    try:
        if cpu_shims or parallel is not None:
            import megatron_cpu

            megatron_cpu.install_cpu_shims()
        torch.distributed.init_process_group(
            "gloo", rank=rank, world_size=world_size, timeout=timedelta(seconds=120)
        )
        if parallel is not None:
            from megatron.core import parallel_state

            parallel_state.initialize_model_parallel(**parallel)
            megatron_cpu.seed_megatron(seed)
        else:
            torch.manual_seed(seed)
        out = _resolve(fn)(*args, **kwargs)
        results.put((rank, "ok", _to_bytes(out)))
    except BaseException:  # noqa: BLE001 - everything goes back to the parent
        results.put((rank, "error", traceback.format_exc()))
    finally:
        try:
            if parallel is not None:
                from megatron.core import parallel_state

                parallel_state.destroy_model_parallel()
            if torch.distributed.is_initialized():
                torch.distributed.destroy_process_group()
        except Exception:  # noqa: BLE001 - teardown after a failure must not mask it
            pass


class DistributedTestError(RuntimeError):
    """A worker rank raised; the message holds its traceback."""


def run_distributed(
    fn: Callable | str,
    world_size: int,
    *args: Any,
    parallel: dict | None = None,
    cpu_shims: bool = True,
    seed: int = 1234,
    timeout: float = 120.0,
    **kwargs: Any,
) -> list[Any]:
    """Run `fn(*args, **kwargs)` on `world_size` gloo ranks; return per-rank results by rank.

    parallel: keyword arguments of `megatron.core.parallel_state.initialize_model_parallel`
        (e.g. `dict(pipeline_model_parallel_size=2, expert_model_parallel_size=2)`); None skips
        Megatron entirely (plain torch.distributed).
    cpu_shims: install tests/megatron_cpu.py shims in each worker (before any Megatron model).
    seed: torch and Megatron RNG seed, identical on every rank.
    timeout: seconds for the whole run; on expiry all workers are killed and TimeoutError raised.
    """
    # free_port() only finds a port that was free a moment ago; with test files running side by side
    # (pytest-xdist) another process can take it before rank 0 listens on it. That launch never started
    # the test: launch again on another port.
    for attempt in range(3):
        try:
            return _launch(fn, world_size, free_port(), args, kwargs, parallel, cpu_shims, seed, timeout)
        except DistributedTestError as err:
            if "EADDRINUSE" not in str(err) or attempt == 2:
                raise
    raise AssertionError("unreachable")


def _launch(
    fn: Callable | str,
    world_size: int,
    port: int,
    args: tuple,
    kwargs: dict,
    parallel: dict | None,
    cpu_shims: bool,
    seed: int,
    timeout: float,
) -> list[Any]:
    ctx = _context()
    results: mp.Queue = ctx.Queue()
    environ, cwd = dict(os.environ), os.getcwd()
    procs = [
        ctx.Process(
            target=_worker,
            args=(environ, cwd, rank, world_size, port, fn, args, kwargs, parallel, cpu_shims, seed, results),
            daemon=False,
        )
        for rank in range(world_size)
    ]
    for proc in procs:
        proc.start()
    collected: dict[int, Any] = {}
    errors: dict[int, str] = {}
    deadline = time.monotonic() + timeout
    try:
        while len(collected) + len(errors) < world_size:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(
                    f"run_distributed: {world_size - len(collected) - len(errors)} rank(s) did not "
                    f"finish within {timeout:.0f} s (finished: {sorted(collected)}, "
                    f"failed: {sorted(errors)})"
                )
            try:
                rank, status, payload = results.get(timeout=min(remaining, 1.0))
            except queue.Empty:
                dead = [
                    r
                    for r, p in enumerate(procs)
                    if not p.is_alive() and r not in collected and r not in errors
                ]
                # A rank that died without reporting (segfault, OOM kill) is an error too; give
                # its queue message a moment to arrive first.
                if dead and results.empty():
                    time.sleep(0.5)
                    if results.empty():
                        for r in dead:
                            errors[r] = f"exited with code {procs[r].exitcode} without a result"
                continue
            if status == "ok":
                collected[rank] = torch.load(io.BytesIO(payload), weights_only=False)
            else:
                errors[rank] = payload
            if errors:
                # Other ranks are likely blocked in a collective with the failed one: stop now.
                break
        if errors:
            detail = "\n".join(f"--- rank {r} ---\n{tb}" for r, tb in sorted(errors.items()))
            raise DistributedTestError(f"{len(errors)} rank(s) failed:\n{detail}")
        return [collected[r] for r in range(world_size)]
    finally:
        for proc in procs:
            proc.join(timeout=5 if not errors else 0.1)
        for proc in procs:
            if proc.is_alive():
                proc.kill()
                proc.join(timeout=5)
        results.close()
