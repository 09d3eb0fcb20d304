"""`backend=deepspeed`: the app's training loop on DeepSpeed's pipeline engine.

`DeepSpeedTrainer` is the Megatron path's `Trainer` with the backend parts swapped: the run loop, the log
line, TensorBoard scalars, validation, the non-finite and exit-signal handling, the progress bar and the
loss plot are the shared ones (`mtp_plugin.train.loop`); setup, one step, evaluation, save and resume are
DeepSpeed's:

- the model is `mtp_plugin.deepspeed`'s PipelineModule (stages x data parallel from `parallel`, experts
  over `expert_model_parallel_size`), the engine `deepspeed.initialize` with the ds_config generated from
  the plugin's config (`mtp_plugin.deepspeed.ds_config`);
- one iteration is `engine.train_batch` over this rank's micro-batches of the global batch (the same
  samples, in the same order, as the Megatron path reads them), λ from the schedule at the tokens
  consumed so far, the learning rate from the plugin's schedule (Megatron's OptimizerParamScheduler's
  formula: linear warmup from 0, then constant / linear / cosine to min_lr at train_iters);
- a non-finite grad norm makes DeepSpeed's ZeRO optimizer skip the update itself (its overflow check,
  on for fp32 and bf16); the plugin then stops (exit 4) or, with training.nonfinite=skip, counts the
  iteration, as on the Megatron path;
- checkpoints are DeepSpeed's (`engine.save_checkpoint`: per-layer module files, ZeRO optimizer shards)
  inside the plugin's atomic `iter_N.tmp` -> `iter_N` + `latest` layout, with iteration, consumed samples
  and tokens, the λ schedule and λ, and the lr step count in DeepSpeed's client state. The model draws no
  random numbers (no dropout, deterministic routing), so a resume continues bit for bit.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

import torch

from mtp_plugin.config import ExperimentConfig, TrainingConfig
from mtp_plugin.core.schedules import schedule_state_dict
from mtp_plugin.train import checkpoint as ckpt
from mtp_plugin.train import data as train_data
from mtp_plugin.train import logs
from mtp_plugin.train.loop import ResumeMismatchError, Trainer, TrainResult
from mtp_plugin.train.loop import run as run_trainer


def lr_at(training: TrainingConfig, step: int) -> float:
    """The learning rate after `step` optimizer steps (Megatron's OptimizerParamScheduler, init_lr 0)."""
    tr = training
    if tr.lr_warmup_iters > 0 and step <= tr.lr_warmup_iters:
        return tr.lr * step / tr.lr_warmup_iters
    if tr.lr_decay_style == "constant":
        return tr.lr
    if step > tr.train_iters:
        return tr.min_lr
    ratio = (step - tr.lr_warmup_iters) / (tr.train_iters - tr.lr_warmup_iters)
    coeff = 1.0 - ratio if tr.lr_decay_style == "linear" else 0.5 * (math.cos(math.pi * ratio) + 1.0)
    return tr.min_lr + coeff * (tr.lr - tr.min_lr)


def init_deepspeed() -> None:
    """DeepSpeed's communication layer over the process group `loop.init_distributed` made."""
    import deepspeed

    deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo")


class DeepSpeedTrainer(Trainer):
    def setup(self) -> None:
        from deepspeed.runtime.pipe.topology import PipeDataParallelTopology

        from mtp_plugin.deepspeed.config import check_experiment
        from mtp_plugin.deepspeed.ds_config import build_ds_config
        from mtp_plugin.deepspeed.meter import DeepSpeedRhoMeter
        from mtp_plugin.deepspeed.model import MTPLoss, build_pipeline_module, initialize_engine

        cfg, par, tr = self.cfg, self.cfg.parallel, self.cfg.training
        check_experiment(cfg)
        ds_config = build_ds_config(cfg, data_parallel_size=self.dp_size)
        self._broadcast_output_dirs()
        self._find_resume()
        pp, ep = par.pipeline_model_parallel_size, par.expert_model_parallel_size
        logs.startup(
            self._print,
            self.is_logging_rank,
            f"initialising {self.world_size} process(es) (deepspeed: pp {pp}, dp {self.dp_size}, ep {ep}, "
            f"ZeRO {cfg.backend.zero_stage})",
        )
        init_deepspeed()
        torch.manual_seed(tr.seed)
        self.loss = MTPLoss(
            num_depths=cfg.mtp.num_depths,
            depth_weights=cfg.mtp.weights if cfg.mtp.enabled else (),
            chunk_tokens=cfg.mtp.loss_chunk_tokens,
            eod_id=cfg.data.eod_id if cfg.mtp.mask_across_eod else None,
        )
        logs.startup(self._print, self.is_logging_rank, "building the model ...")
        self.pipe = build_pipeline_module(
            cfg.model,
            cfg.mtp,
            num_stages=pp,
            loss=self.loss,
            ep_size=ep,
            capacity_factor=cfg.backend.moe_capacity_factor,
            min_capacity=cfg.backend.moe_min_capacity,
            seed=tr.seed,
            topology=PipeDataParallelTopology(num_pp=pp, num_dp=self.dp_size),
            zero_stage=cfg.backend.zero_stage,
        )
        self.engine = initialize_engine(
            self.pipe, ds_config, weight_decay=tr.weight_decay, ep_size=ep if cfg.model.is_moe else None
        )
        self.optimizer = self.engine.optimizer
        grid = self.engine.grid
        self.dp_group = grid.get_data_parallel_group()
        self.dp_rank = grid.get_data_parallel_id()
        self.is_first_stage = self.engine.is_first_stage()
        self.is_last_stage = self.engine.is_last_stage()
        self.lr_steps = 0  # optimizer steps applied (skipped iterations do not advance the lr schedule)
        self._set_lr()
        self._build_data_and_metrics(self.pipe)
        self.rho_meter = DeepSpeedRhoMeter(
            cfg.model, cfg.mtp.num_depths, peak_tflops=tr.peak_tflops_per_device or None
        ).attach(self.pipe, self.loss)
        self._maybe_resume()

    def _set_lr(self) -> None:
        lr = lr_at(self.cfg.training, self.lr_steps)
        for group in self.optimizer.param_groups:
            group["lr"] = lr

    def _batches(self, dataset, first_sample: int):
        """This rank's micro-batches of the global batch at `first_sample`, as the pipe engine takes them."""
        tr = self.cfg.training
        for batch in train_data.micro_batches(
            dataset,
            first_sample=first_sample,
            global_batch_size=tr.global_batch_size,
            micro_batch_size=tr.micro_batch_size,
            dp_rank=self.dp_rank,
            dp_size=self.dp_size,
            device=self.engine.device,
        ):
            yield (batch["tokens"],), (batch["labels"], batch["loss_mask"])

    def train_step(self) -> dict[str, float]:
        tr = self.cfg.training
        lam = self.schedule(self.consumed_tokens)
        self.loss.lam = lam
        self.metrics.reset()
        self.loss.metrics = self.metrics
        lr = self.optimizer.param_groups[0]["lr"]
        skipped_before = self.engine.skipped_steps
        self.engine.train_batch(self._batches(self.train_ds, self.consumed_samples))
        self.loss.metrics = None
        # ZeRO-0 without clipping computes no norm (None): then only the losses and DeepSpeed's skip count.
        norm = self.engine.get_global_grad_norm()
        grad_norm = float("nan") if norm is None else float(norm)
        where = self._nonfinite_losses(self.metrics)
        self.rho_meter.end_step()
        bad_norm = norm is not None and not math.isfinite(grad_norm)
        if where or bad_norm or self.engine.skipped_steps != skipped_before:
            return self._nonfinite_step(where, grad_norm, lam)
        self.skips_in_a_row = 0
        self.window_metrics.merge(self.metrics)
        self.iteration += 1
        self.lr_steps += 1
        self.consumed_samples += tr.global_batch_size
        self._set_lr()
        values = self.metrics.reduce(self.dp_group) if self.is_last_stage else {}
        return {**values, "mtp lambda": lam, "learning rate": lr, "grad norm": grad_norm}

    def evaluate(self) -> dict[str, float]:
        if self.valid_ds is None:
            return {}
        self.valid_metrics.reset()
        self.loss.lam = self.schedule(self.consumed_tokens)
        self.loss.metrics = self.valid_metrics
        for i in range(self.cfg.training.eval_iters):
            first = i * self.cfg.training.global_batch_size
            self.engine.eval_batch(self._batches(self.valid_ds, first))
        self.loss.metrics = None
        self.engine.train()
        self._check_finite(self.valid_metrics, "validation")
        return self.valid_metrics.reduce(self.dp_group) if self.is_last_stage else {}

    def _layout(self) -> dict[str, int]:
        return {**super()._layout(), "zero_stage": self.cfg.backend.zero_stage}

    def save(self) -> Path:
        client_state = {
            "iteration": self.iteration,
            "lr_steps": self.lr_steps,
            "consumed_samples": self.consumed_samples,
            "consumed_tokens": self.consumed_tokens,
            "lambda_schedule": schedule_state_dict(self.schedule),
            "lambda": self.schedule(self.consumed_tokens),
            "config": asdict(self.cfg),
        }

        def write(tmp: Path) -> None:
            self.engine.save_checkpoint(
                str(tmp.parent), tag=tmp.name, client_state=client_state, save_latest=False
            )
            if torch.distributed.get_rank() == 0:
                marker = {"format": "deepspeed", "iteration": self.iteration, "layout": self._layout()}
                (tmp / ckpt.DEEPSPEED_MARKER).write_text(json.dumps(marker, indent=1) + "\n")

        path = ckpt.atomic_save(
            self.cfg.training.save_dir,
            self.iteration,
            write,
            run_config=ckpt.run_config(self.cfg),
            keep_last=self.cfg.training.keep_last_checkpoints,
            estimated_bytes=ckpt.estimate_bytes(self.pipe.parameters()) // self.dp_size,
        )
        return self._saved(path)

    def _maybe_resume(self) -> None:
        path = self.resume_from
        if path is None:
            return
        marker_file = path / ckpt.DEEPSPEED_MARKER
        if not marker_file.is_file():
            raise ResumeMismatchError(
                f"error: {path} is a backend=megatron checkpoint; backend=deepspeed resumes only its own "
                "checkpoints: point training.load_dir elsewhere (null starts fresh)"
            )
        saved_layout = json.loads(marker_file.read_text())["layout"]
        if saved_layout != self._layout():
            layout = ", ".join(f"{k} {saved_layout.get(k)} -> {v}" for k, v in self._layout().items())
            raise ResumeMismatchError(
                f"error: {path} was written under another layout ({layout}); DeepSpeed's ZeRO optimizer "
                "shards are bound to it: resume with the checkpoint's layout"
            )
        _, client = self.engine.load_checkpoint(
            str(path.parent), tag=path.name, load_optimizer_states=True, load_lr_scheduler_states=False
        )
        self.iteration = int(client["iteration"])
        self.lr_steps = int(client["lr_steps"])
        self.consumed_samples = int(client["consumed_samples"])
        self._set_lr()
        lambda_note = self._resume_lambda(client.get("lambda_schedule"))
        if self.is_logging_rank:
            self._print(
                f" loaded checkpoint {path} at iteration {self.iteration} (consumed tokens {self.consumed_tokens}, "
                f"λ {self.schedule(self.consumed_tokens):g})"
            )
            if lambda_note:
                self._print(lambda_note)

    def close(self) -> None:
        self.rho_meter.detach()


def run(cfg: ExperimentConfig, *, print_fn: Callable[[str], None] | None = None) -> TrainResult:
    """Train `cfg` with DeepSpeed in this process (one rank of a torchrun / deepspeed-launcher job)."""
    # DeepSpeed's launcher passes --local_rank and sets LOCAL_RANK; torchrun sets LOCAL_RANK too.
    os.environ.setdefault("LOCAL_RANK", "0")
    return run_trainer(cfg, print_fn=print_fn, trainer_cls=DeepSpeedTrainer)
