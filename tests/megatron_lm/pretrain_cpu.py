"""Run a Megatron-LM training script (e.g. a patched pretrain_gpt.py) on CPU over gloo, one process. Test-only.

    python tests/megatron_lm/pretrain_cpu.py SCRIPT.py [Megatron-LM flags...]

Megatron-LM's `pretrain()` asserts CUDA and, with no CUDA device, skips the model-parallel groups and the RNG
tracker; this runner sets those up first (as tests/megatron_lm_harness.py does), answers the CUDA queries
with the CPU, then runs SCRIPT as `__main__`, so `pretrain()` and everything after it is Megatron-LM's own.
"""

from __future__ import annotations

import os
import runpy
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import megatron_lm_harness  # noqa: E402  (first: the Python 3.11 shim megatron.training needs)
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from distributed_utils import free_port  # noqa: E402


def main() -> None:
    script, flags = sys.argv[1], sys.argv[2:]
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    # A free port, not a fixed one: CI runs test files side by side (pytest-xdist).
    os.environ.setdefault("MASTER_PORT", str(free_port()))
    dist.init_process_group("gloo", rank=0, world_size=1)
    from megatron.core import parallel_state, tensor_parallel
    from megatron_cpu import install_cpu_shims

    install_cpu_shims()
    megatron_lm_harness.cpu_streams()
    # One process: tp = pp = ep = 1. The seed pretrain() would give the tracker on a GPU.
    parallel_state.initialize_model_parallel()
    seed = int(flags[flags.index("--seed") + 1]) if "--seed" in flags else 1234
    tensor_parallel.model_parallel_cuda_manual_seed(seed, inference_rng_tracker=True)
    # Only initialize_megatron's start-up assert is told CUDA exists; everything else keeps the truth.
    torch.cuda.is_available = lambda: sys._getframe(1).f_code.co_name == "initialize_megatron"
    torch.cuda.memory_allocated = torch.cuda.max_memory_allocated = lambda device=None: 0
    torch.cuda.memory_reserved = torch.cuda.max_memory_reserved = lambda device=None: 0
    try:  # core_v0.16's initialize_megatron always builds the legacy CUDA kernels (nvcc); none exist on CPU
        import megatron.legacy.fused_kernels as legacy_kernels

        legacy_kernels.load = lambda args: None
    except ImportError:
        pass
    sys.path.insert(0, str(Path(script).resolve().parent))
    sys.argv = [script, *flags, *megatron_lm_harness.CPU_FLAGS]
    runpy.run_path(script, run_name="__main__")


if __name__ == "__main__":
    main()
