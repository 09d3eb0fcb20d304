"""Export a checkpoint of the app to Hugging Face's DeepSeek-V3 layout, MTP layers included, and back.

Both directions check everything that can be checked before any tensor is read, write into a temporary
directory beside the output and rename it when complete (an interrupted run leaves no output), and refuse
an output path that exists.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path

import torch

from mtp_plugin.config import ExperimentConfig
from mtp_plugin.convert import layout
from mtp_plugin.convert.megatron_io import (
    CheckpointError,
    MegatronCheckpoint,
    model_of,
    num_depths_of,
    resolve_checkpoint,
    run_config_of,
    write_weights_only,
)
from mtp_plugin.convert.safetensors_io import HFCheckpoint, HFCheckpointError, ShardWriter
from mtp_plugin.train import checkpoint as ckpt

DEFAULT_SHARD_BYTES = 2 * 1024**3

ConvertError = (CheckpointError, HFCheckpointError, layout.UnsupportedModel)


def _check_new_output(out: Path) -> None:
    if out.exists():
        raise CheckpointError(f"--out {out} exists; pass a new path (nothing is overwritten)")
    if not out.parent.is_dir():
        raise CheckpointError(
            f"--out {out}: its parent directory {out.parent} does not exist; create it first"
        )


@contextlib.contextmanager
def _written_beside(out: Path):
    """A temporary directory beside `out`, renamed to `out` once the block completes and removed if it fails:
    a reader never sees a half-written output."""
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
        os.replace(tmp, out)  # complete: one atomic rename
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _progress(total: int, desc: str):
    from tqdm import tqdm

    # On a terminal only (tqdm's disable=None): logs and captured output stay one line per event.
    return tqdm(total=total, desc=desc, unit="layer", disable=None)


def export_checkpoint(
    checkpoint: str | os.PathLike,
    out: str | os.PathLike,
    *,
    max_shard_bytes: int = DEFAULT_SHARD_BYTES,
    log: Callable[[str], None] = print,
) -> dict:
    """Write `out` (a new directory): config.json, sharded safetensors and their index. Returns a summary."""
    out = Path(out)
    _check_new_output(out)
    path = resolve_checkpoint(checkpoint)
    run_config = run_config_of(path)
    model = model_of(run_config)
    depths = num_depths_of(run_config)
    layout.check_exportable(model)  # before any tensor is read
    if (path / ckpt.DEEPSPEED_MARKER).is_file():
        raise CheckpointError(
            f"{path} is a backend=deepspeed checkpoint; its layers (softmax top-k MoE, no MLA) have no Hugging "
            "Face layout with MTP layers, so no such checkpoint can be exported"
        )
    source = MegatronCheckpoint(path)
    units = layout.units(model, depths)
    missing = [
        unit.megatron_prefix + rule.megatron
        for unit in units
        for rule in unit.rules
        if unit.megatron_prefix + rule.megatron not in source and not rule.megatron.endswith("expert_bias")
    ]
    if missing:
        raise CheckpointError(
            f"{path} has no tensor {missing[0]} ({len(missing)} missing); it was not written by this plugin's "
            "Megatron backend for the model in its run_config.json"
        )
    dtype = source.shapes[layout.EMBEDDING][1]
    config = layout.hf_config(model, depths, dtype=dtype)
    start = time.perf_counter()
    with _written_beside(out) as tmp:
        writer = ShardWriter(tmp, max_shard_bytes)
        shared = source.read([layout.EMBEDDING, layout.head_name(model)])
        embedding, head = shared[layout.EMBEDDING], shared[layout.head_name(model)]
        with _progress(len(units), "export") as bar:
            for unit in units:
                keys = [unit.megatron_prefix + r.megatron for r in unit.rules]
                tensors = source.read([k for k in keys if k in source])
                for rule, key in zip(unit.rules, keys):
                    tensor = tensors.get(key)
                    if tensor is None:  # a router without the balancing bias: DeepSeek-V3's bias is zero then
                        tensor = torch.zeros(model.num_experts, dtype=torch.float32)
                    for name, value in layout.to_hf(rule, unit.hf_prefix, tensor):
                        writer.add(name, value)
                if unit.depth:
                    writer.add(unit.hf_prefix + layout.HF_DEPTH_EMBED, embedding)
                    writer.add(unit.hf_prefix + layout.HF_DEPTH_HEAD, head)
                del tensors
                bar.update(1)
        files = writer.close()
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    seconds = time.perf_counter() - start
    log(
        f" exported {path} -> {out}: {model.num_layers} layers + {depths} MTP layer(s) as {layout.MODEL_TYPE}, "
        f"{len(files)} shard(s), {writer.total_bytes / 1e6:.1f} MB in {seconds:.1f} s"
    )
    return {"seconds": seconds, "bytes": writer.total_bytes, "shards": len(files), "path": str(out)}


def import_checkpoint(
    hf_dir: str | os.PathLike,
    out: str | os.PathLike,
    cfg: ExperimentConfig,
    *,
    log: Callable[[str], None] = print,
) -> dict:
    """Write `out` (a new directory): a weights-only checkpoint of the run `cfg` from the HF checkpoint
    `hf_dir`, which `training.load_dir=out` starts from. Depths beyond the HF checkpoint's MTP layers
    keep the run's initialisation (said in the log)."""
    out = Path(out)
    _check_new_output(out)
    source = HFCheckpoint(hf_dir)
    config = source.config
    model = cfg.model
    layout.check_exportable(model)
    if config.get("model_type") != layout.MODEL_TYPE:
        raise HFCheckpointError(
            f"{source.directory / 'config.json'}: model_type={config.get('model_type')!r}; only "
            f"{layout.MODEL_TYPE!r} checkpoints are imported"
        )
    differences = layout.config_differences(model, config)
    if differences:
        raise HFCheckpointError(
            f"{source.directory / 'config.json'} does not describe the run's model: "
            + "; ".join(differences)
            + "; import with the model= / model.* overrides of the run that trains it"
        )
    hf_depths = int(config.get("num_nextn_predict_layers") or 0)
    depths = cfg.mtp.num_depths
    units = layout.units(model, min(hf_depths, depths))
    needed = [
        name
        for unit in units
        for rule in unit.rules
        for name in layout.hf_names(rule, unit.hf_prefix, model.num_experts)
    ]
    absent = [name for name in needed if name not in source.weight_map]
    if absent:
        raise HFCheckpointError(
            f"{source.directory} has no tensor {absent[0]} ({len(absent)} missing) although its config.json "
            "describes it; the checkpoint is incomplete"
        )
    by_key: dict[str, tuple[layout.Rule, str]] = {}
    for unit in units:
        for rule in unit.rules:
            by_key[unit.megatron_prefix + rule.megatron] = (rule, unit.hf_prefix)
    if hf_depths < depths:
        log(
            f" {source.directory} holds {hf_depths} MTP layer(s) and the run trains D = {depths}: depth(s) "
            f"{', '.join(str(k) for k in range(hf_depths + 1, depths + 1))} start from the run's initialisation "
            f"(seed {cfg.training.seed})"
        )
    elif hf_depths > depths:
        log(
            f" {source.directory} holds {hf_depths} MTP layers and the run trains D = {depths}: layers "
            f"{model.num_layers + depths} .. {model.num_layers + hf_depths - 1} are not imported"
        )
    used: set[str] = set()

    def tensor_for(key: str) -> torch.Tensor | None:
        if key not in by_key:
            return None
        used.add(key)
        rule, prefix = by_key[key]
        return layout.from_hf(rule, prefix, source.get, model.num_experts)

    start = time.perf_counter()
    with _written_beside(out) as tmp:
        write_weights_only(cfg, tmp, tensor_for)
        unset = sorted(set(by_key) - used)
        if unset:
            raise CheckpointError(
                f"the run's model has no tensor {unset[0]} ({len(unset)} HF tensors unused); the import table "
                "does not match this megatron-core's model"
            )
    seconds = time.perf_counter() - start
    log(
        f" imported {source.directory} -> {out}/{ckpt.checkpoint_name(0)}: {model.num_layers} layers + "
        f"{min(hf_depths, depths)} MTP layer(s) in {seconds:.1f} s; train from it with training.load_dir={out.resolve()}"
    )
    return {"seconds": seconds, "path": str(out)}
