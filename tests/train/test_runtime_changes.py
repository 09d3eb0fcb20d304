"""What the product changes in Megatron-Core and torch at run time (README "What the plugin changes at run
time"), measured: the product's own CPU training path (`enable_megatron_on_cpu`, then the Trainer's setup
and one iteration), in a fresh process with none of the tests' shims, with every function and class of
every loaded `megatron.*` module (and their classes' methods) and of `torch.cuda` compared before and
after. And the tests' training loops run only what the product allows on CPU: the Trainer refuses the
alltoall dispatcher there, as the app does.
"""

from __future__ import annotations

import sys
import types

import pytest
from distributed_utils import run_distributed
from train_tiny import tiny_experiment, write_tiny_corpus

pytestmark = [pytest.mark.megatron]


def _dunder(name: str) -> bool:
    return name.startswith("__")


def _is_code(value) -> bool:
    return callable(value) or isinstance(value, (staticmethod, classmethod, property))


def _snapshot() -> dict[tuple[str, str], object]:
    """{(module, 'attr' or 'Class.attr'): the object} for every function/class/method-like value of
    megatron.* and torch.cuda, and every other name by a marker (so additions and removals show, while
    Megatron's own state - process groups, buffers - may change)."""
    out: dict[tuple[str, str], object] = {}
    for name, module in list(sys.modules.items()):
        if module is None or not (name.startswith("megatron") or name == "torch.cuda"):
            continue
        for attr, value in list(vars(module).items()):
            # Not changes: Python's and torch's bookkeeping (__warningregistry__, a Protocol's __init__ set
            # on first use, torch.compile's __builtins_dict___N globals) and a package's attribute for a
            # submodule imported later.
            if _dunder(attr) or isinstance(value, types.ModuleType):
                continue
            out[name, attr] = value if _is_code(value) else "<value>"
            if isinstance(value, type) and value.__module__ == name:
                for member, code in vars(value).items():
                    if _is_code(code) and not _dunder(member):
                        out[name, f"{attr}.{member}"] = code
    return out


def _product_run_worker(train_prefix: str, valid_prefix: str) -> dict:
    from mtp_plugin.train import cpu
    from mtp_plugin.train.loop import Trainer

    cfg = tiny_experiment(train_prefix, valid_prefix, train_iters=1, lr_warmup_iters=0)
    trainer = Trainer(cfg, print_fn=lambda line: None)  # imports what the run uses before the snapshot
    before = _snapshot()
    cpu.enable_megatron_on_cpu()  # what the app does first on a machine without CUDA
    trainer.setup()
    result = trainer.train()
    trainer.close()
    after = _snapshot()
    import torch

    modes = [type(m).__name__ for m in torch.overrides._get_current_function_mode_stack()]
    from importlib.metadata import version

    old_modules = {module for module, _ in before}  # modules Megatron imports later are not changes
    dotted = lambda keys: sorted(f"{module}.{attr}" for module, attr in keys)
    return {
        "added": dotted(k for k in after.keys() - before.keys() if k[0] in old_modules),
        "removed": dotted(before.keys() - after.keys()),
        "changed": dotted(k for k in before.keys() & after.keys() if before[k] is not after[k]),
        "iterations": result.iterations,
        "torch_function_modes": modes,
        "megatron_core": version("megatron-core"),
    }


def test_the_product_changes_exactly_what_the_readme_says(tmp_path):
    train, valid = write_tiny_corpus(tmp_path / "data")
    (out,) = run_distributed(
        _product_run_worker, 1, train, valid, parallel=None, cpu_shims=False, timeout=240
    )
    assert out["iterations"] == 1
    # torch.cuda's device, synchronize and stream queries answered by the CPU (mtp_plugin.train.cpu).
    torch_cuda = ["torch.cuda.current_device", "torch.cuda.current_stream", "torch.cuda.synchronize"]
    assert out["changed"] == torch_cuda, out
    assert out["torch_function_modes"] == ["_CudaToCpuMode"]  # device="cuda" / .cuda() -> CPU
    # megatron-core 0.16.x only: moe_utils.te_general_gemm defined as None (mtp_plugin.megatron.compat);
    # nothing else of Megatron is added, removed or replaced.
    te_fix = ["megatron.core.transformer.moe.moe_utils.te_general_gemm"]
    assert out["added"] == (te_fix if out["megatron_core"].startswith("0.16.") else []), out
    assert out["removed"] == [], out


def test_a_trainer_on_cpu_refuses_the_alltoall_dispatcher_before_anything_starts(tmp_path):
    """The tests' training loops (tests/train_tiny.py) use allgather because the product allows no other
    dispatcher on CPU; a Trainer given alltoall there stops in one line, before any process group."""
    import dataclasses

    import torch

    from mtp_plugin.train.loop import Trainer

    cfg = tiny_experiment("unused", None)
    assert cfg.model.moe_token_dispatcher_type == "allgather"
    cfg.model = dataclasses.replace(cfg.model, moe_token_dispatcher_type="alltoall")
    with pytest.raises(ValueError, match="^model.moe_token_dispatcher_type=alltoall needs CUDA streams; use"):
        Trainer(cfg)
    assert not torch.distributed.is_initialized()
