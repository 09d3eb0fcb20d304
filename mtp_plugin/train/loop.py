"""A lean training loop on megatron.core: the plugin's MTP GPT model, Megatron DDP and optimizer.

    trainer = Trainer(cfg)       # cfg: ExperimentConfig; torch.distributed already initialised
    trainer.setup()              # model-parallel groups, model, DDP, optimizer, data, resume
    result = trainer.train()     # steps, logs, evaluations, checkpoints, the loss plot
    trainer.close()

One iteration: `get_forward_backward_func()` runs the global batch's micro-batches through this
pipeline stage with `mtp_forward_step` (λ from the schedule at the tokens consumed so far), Megatron
DDP reduces the gradients (`finalize_model_grads`), the Megatron optimizer steps and
`OptimizerParamScheduler` sets the next learning rate. The per-depth metrics are a `MTPMetrics` owned
here and reduced across data-parallel ranks each step; the last rank logs them (Megatron-LM's
`print_rank_last` convention). A non-finite loss at any depth on any rank stops every rank before the
optimizer step, so neither the weights nor the last checkpoint see it; so does a non-finite grad norm
(taken before Megatron's optimizer applies the update). `training.nonfinite=skip` counts such an iteration
without updating instead.

Exit codes of `run` (and so of `python -m mtp_plugin.train`): 0 trained (or nothing left to train); 2 a
configuration or resume mismatch; EXIT_SIGNAL (3) one of `training.exit_signals` arrived: the iteration
finished, a checkpoint was saved, rerun the same command to resume; EXIT_NONFINITE (4) a non-finite loss or
grad norm stopped the run before its update; EXIT_SAVE_FAILED (5) a checkpoint did not fit the free space or
its write failed (the partial one removed, `latest` untouched); 128 + signal number: a second signal aborted
without saving.
"""

from __future__ import annotations

import functools
import math
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from mtp_plugin.config import ExperimentConfig
from mtp_plugin.config.mtp import first_iteration_at
from mtp_plugin.core.schedules import (
    keep_passed_switches,
    schedule_from_state_dict,
    schedule_state_dict,
    switch_points,
)
from mtp_plugin.megatron import (
    MTPMetrics,
    RhoMeter,
    build_mtp_gpt_model,
    check_supported,
    mtp_forward_step,
    transformer_config_from,
)
from mtp_plugin.megatron.compat import optional_accelerators
from mtp_plugin.train import checkpoint as ckpt
from mtp_plugin.train import data as train_data
from mtp_plugin.train import logs

EXIT_SIGNAL = 3  # stopped by one of training.exit_signals after saving; rerun the same command to resume
EXIT_NONFINITE = 4  # a non-finite loss or grad norm stopped the run before its update
EXIT_SAVE_FAILED = 5  # a checkpoint could not be written (no space, I/O error); the previous one is intact
MAX_SKIPS_IN_A_ROW = 10  # training.nonfinite=skip gives up after this many non-finite iterations in a row


class NonFiniteLossError(RuntimeError):
    """A loss at some depth or the grad norm was NaN or Inf; raised on every rank, naming where."""


class ResumeMismatchError(ValueError):
    """The checkpoint in training.load_dir was written with another model, MTP or data configuration, or
    one of its files is no longer the size it was saved with."""


class StoppedBeforeTraining(SystemExit):
    """An exit signal arrived during start-up: exit status EXIT_SIGNAL, nothing trained or saved."""


class SignalAbort(SystemExit):
    """A second exit signal: leave at once, without saving (exit status 128 + the signal's number)."""


class ExitSignals:
    """Megatron-LM's --exit-signal-handler: the first of `names` only sets `received`, the loop agrees on it
    across ranks, saves and exits; a second one raises SignalAbort wherever the process is.

    The same signal again within `repeat_window_s` of the first is that first request delivered twice, not a
    second one: Slurm (a time limit, scancel) and a terminal's Ctrl-C signal every process of the job or
    process group, and torchrun or DeepSpeed's launcher forward what they received to their ranks as well.

    Signal handlers belong to the main thread; elsewhere (or with no names) this does nothing."""

    def __init__(
        self, names: list[str], print_fn: Callable[[str], None], *, repeat_window_s: float = 1.0
    ) -> None:
        self.signums = [getattr(signal, name) for name in names]
        self.received: int | None = None
        self._received_at = 0.0
        self._repeat_window_s = repeat_window_s
        self._print = print_fn
        self._previous: dict[int, object] = {}

    def _handle(self, signum, frame) -> None:
        now = time.monotonic()
        if self.received is None:
            self.received, self._received_at = signum, now
        elif signum != self.received or now - self._received_at > self._repeat_window_s:
            self._print(f" second {signal.Signals(signum).name}: aborting without saving")
            raise SignalAbort(128 + signum)

    def __enter__(self) -> ExitSignals:
        if threading.current_thread() is threading.main_thread():
            for signum in self.signums:
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()


# Cluster ρ fields carried into the log line and TensorBoard (the meter computes more; see docs/rho_meter.md).
RHO_LOG_FIELDS = ("rho_ceiling bits/GFLOP", "rho_effective bits/GFLOP", "TFLOP/s/GPU", "MFU")


@dataclass
class TrainResult:
    """What a run leaves behind. Histories are filled on the logging (last) rank only."""

    iterations: int = 0
    consumed_tokens: int = 0
    start_iteration: int = 0  # where this run began: > 0 when it resumed from a checkpoint
    start_tokens: int = 0
    train_history: list[dict[str, float]] = field(default_factory=list)  # one entry per iteration
    valid_history: list[dict[str, float]] = field(default_factory=list)
    rho_history: list[dict[str, float]] = field(default_factory=list)  # one entry per log interval
    last_checkpoint: str | None = None
    stop_signal: str | None = None  # the exit signal that ended the run early (e.g. "SIGTERM")
    skipped_iterations: int = 0  # non-finite iterations counted without an update (training.nonfinite=skip)
    plot_path: str | None = None
    wall_s: float = 0.0
    peak_memory_gib: float | None = None  # torch.cuda.max_memory_allocated; None on CPU


def _dtype(name: str) -> torch.dtype:
    return {"float32": torch.float32, "bfloat16": torch.bfloat16}[name]


class Trainer:
    def __init__(self, cfg: ExperimentConfig, *, print_fn: Callable[[str], None] | None = None) -> None:
        if not torch.cuda.is_available() and cfg.backend.name == "megatron":
            from mtp_plugin.train.cpu import check_cpu_run

            # The app checks this at launch too; a Trainer built directly is held to the same rule.
            check_cpu_run(cfg.model)
        if not torch.distributed.is_initialized():
            raise RuntimeError("Trainer needs torch.distributed initialised (see mtp_plugin.train.launch)")
        self.cfg = cfg
        self.world_size = torch.distributed.get_world_size()
        self.rank = torch.distributed.get_rank()
        self.dp_size = cfg.check_world_size(self.world_size)
        self.num_micro_batches = cfg.training.num_micro_batches(self.dp_size)
        self.device = (
            torch.device("cuda", torch.cuda.current_device())
            if torch.cuda.is_available()
            else torch.device("cpu")
        )
        self.is_logging_rank = self.rank == self.world_size - 1
        if cfg.backend.deterministic:
            use_deterministic_kernels()
        self._print = print_fn or functools.partial(print, flush=True)
        self.schedule = cfg.mtp.lambda_schedule.build()
        self.iteration = 0
        self.consumed_samples = 0
        self.skips_in_a_row = 0
        self.resume_from: Path | None = None  # the checkpoint setup() loads, if any
        self.result = TrainResult()

    # ------------------------------------------------------------------ setup

    def setup(self) -> None:
        from megatron.core import parallel_state as ps
        from megatron.core import tensor_parallel
        from megatron.core.distributed import (
            DistributedDataParallel,
            DistributedDataParallelConfig,
            finalize_model_grads,
        )
        from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
        from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler
        from megatron.core.transformer.module import Float16Module

        cfg, par, tr = self.cfg, self.cfg.parallel, self.cfg.training
        plan = check_supported(cfg.model, par, cfg.mtp)
        self._broadcast_output_dirs()
        self._find_resume()
        if self.resume_from is not None:
            self._check_expert_layout(ckpt.saved_layout(self.resume_from))
        sizes = f"tp {par.tensor_model_parallel_size}, pp {par.pipeline_model_parallel_size}, ep {par.expert_model_parallel_size}"
        logs.startup(
            self._print, self.is_logging_rank, f"initialising {self.world_size} process(es) ({sizes})"
        )
        ps.initialize_model_parallel(
            tensor_model_parallel_size=par.tensor_model_parallel_size,
            pipeline_model_parallel_size=par.pipeline_model_parallel_size,
            expert_model_parallel_size=par.expert_model_parallel_size,
            context_parallel_size=par.context_parallel_size,
            # Every stage holding a copy of the word embedding (stage 0, the MTP stage, a tied head)
            # joins the group whose gradients finalize_model_grads sums.
            get_embedding_ranks=plan.embedding_ranks_fn(
                tied_head=not cfg.model.untie_embeddings_and_output_weights
            ),
        )
        self.dp_group = ps.get_data_parallel_group()
        self.dp_rank = ps.get_data_parallel_rank()
        self.is_first_stage = ps.is_pipeline_first_stage()
        self.is_last_stage = ps.is_pipeline_last_stage()
        torch.manual_seed(tr.seed)
        # The inference tracker keeps per-region RNG states without asserting CUDA, so CPU runs work.
        tensor_parallel.model_parallel_cuda_manual_seed(
            tr.seed, inference_rng_tracker=self.device.type == "cpu"
        )

        params_dtype = _dtype(cfg.backend.params_dtype)
        self.tf_config = transformer_config_from(
            cfg.model,
            par,
            cfg.mtp,
            params_dtype=params_dtype,
            deterministic_mode=cfg.backend.deterministic,
        )
        logs.startup(self._print, self.is_logging_rank, "building the model ...")
        model = build_mtp_gpt_model(
            cfg.model,
            cfg.mtp,
            self.tf_config,
            pre_process=self.is_first_stage,
            post_process=self.is_last_stage,
            eod_id=cfg.data.eod_id,
            plan=plan,
        )
        model.to(self.device)
        # bf16 as Megatron-LM's get_model does it: Float16Module casts every parameter, the torch norms'
        # fp32 weights included, to bf16. Megatron's Float16 optimizer keys its fp32 main params and the
        # checkpoint's optimizer entries by the bf16 params; a stray fp32 param would shift those ids
        # ("Param id N does not match any model sharded param" at the first save).
        module = Float16Module(self.tf_config, model) if self.tf_config.bf16 else model
        ddp_config = DistributedDataParallelConfig(
            grad_reduce_in_fp32=True,
            overlap_grad_reduce=False,
            use_distributed_optimizer=cfg.backend.use_distributed_optimizer,
        )
        self.model = model
        self.ddp = DistributedDataParallel(self.tf_config, ddp_config, module=module)
        self.ddp.broadcast_params()  # identical replicas whatever each rank's initialisation did
        opt_config = OptimizerConfig(
            optimizer="adam",
            lr=tr.lr,
            min_lr=tr.min_lr,
            weight_decay=tr.weight_decay,
            adam_beta1=tr.adam_beta1,
            adam_beta2=tr.adam_beta2,
            adam_eps=tr.adam_eps,
            clip_grad=tr.clip_grad,
            bf16=params_dtype == torch.bfloat16,
            params_dtype=params_dtype,
            use_distributed_optimizer=cfg.backend.use_distributed_optimizer,
        )
        self.optimizer = get_megatron_optimizer(opt_config, [self.ddp])
        self.scheduler = OptimizerParamScheduler(
            self.optimizer,
            init_lr=0.0,
            max_lr=tr.lr,
            min_lr=tr.min_lr,
            lr_warmup_steps=tr.lr_warmup_iters,
            lr_decay_steps=tr.train_iters,
            lr_decay_style=tr.lr_decay_style,
            start_wd=tr.weight_decay,
            end_wd=tr.weight_decay,
            wd_incr_steps=tr.train_iters,
            wd_incr_style="constant",
            # A resume follows this run's lr settings (a longer train_iters re-derives the decay), not the
            # checkpoint's, which Megatron's default would keep silently; _maybe_resume says what changed.
            use_checkpoint_opt_param_scheduler=False,
            override_opt_param_scheduler=True,
        )
        self.tf_config.no_sync_func = self.ddp.no_sync
        self.tf_config.finalize_model_grads_func = finalize_model_grads
        self.tf_config.grad_scale_func = self.optimizer.scale_loss

        self._build_data_and_metrics(model)
        self.rho_meter = RhoMeter(
            cfg.model, cfg.mtp, cfg.parallel, peak_tflops=tr.peak_tflops_per_device or None
        ).attach([self.ddp])
        if self.is_logging_rank:
            found = optional_accelerators()
            self._print(
                " optional kernels: "
                + ", ".join(f"{k} {'yes' if v else 'no (torch fallback)'}" for k, v in found.items())
            )
        self._maybe_resume()

    def _build_data_and_metrics(self, model) -> None:
        """After the model: the datasets and the per-depth metrics of steps, validation and log windows."""
        cfg, tr = self.cfg, self.cfg.training
        n_params = sum(p.numel() for p in model.parameters())
        logs.startup(
            self._print,
            self.is_logging_rank,
            f"built the model ({n_params:,} parameters on this rank); building datasets ...",
        )
        self.train_ds, self.valid_ds = train_data.build_datasets(cfg.data, cfg.model, tr, seed=tr.seed)
        self.metrics = MTPMetrics(cfg.mtp.num_depths)
        self.valid_metrics = MTPMetrics(cfg.mtp.num_depths)
        # ρ: FLOPs this rank executed and bits it scored, summed over the cluster once per log interval.
        self.window_metrics = MTPMetrics(cfg.mtp.num_depths)

    def _find_resume(self) -> None:
        """Before any model exists: the checkpoint to resume from; one of another model, MTP or data
        setup is refused in one line."""
        self.resume_from = ckpt.latest_checkpoint(self.cfg.training.load_dir)
        self.start_from = None
        if self.resume_from is None:
            self.start_from = self._find_pretrained()
        if self.resume_from is not None:
            try:  # the app checked it at launch; a Trainer built directly is held to the same rule
                ckpt.check_file_sizes(self.resume_from)
            except ValueError as err:
                raise ResumeMismatchError(f"error: {err}") from None
            differences = ckpt.run_config_differences(self.resume_from, ckpt.run_config(self.cfg))
            if differences:
                raise ResumeMismatchError(
                    f"error: {self.resume_from} was written with another configuration: "
                    + "; ".join(differences)
                    + " (checkpoint vs this run); resume with the checkpoint's values, or point "
                    "training.load_dir elsewhere (null starts fresh)"
                )

    def _find_pretrained(self) -> Path | None:
        """training.pretrained_checkpoint when there is nothing to resume: its model must be this run's."""
        cfg = self.cfg
        if not cfg.training.pretrained_checkpoint:
            if cfg.mtp.trunk_gradients == "frozen":
                raise ResumeMismatchError(
                    f"error: mtp.trunk_gradients=frozen needs a trained trunk to start from and "
                    f"training.load_dir={cfg.training.load_dir} holds no checkpoint; set "
                    "training.pretrained_checkpoint=DIR"
                )
            return None
        try:
            path = ckpt.finished_checkpoint(cfg.training.pretrained_checkpoint)
        except FileNotFoundError as err:
            raise ResumeMismatchError(f"error: training.pretrained_checkpoint: {err}") from None
        stored = ckpt.stored_run_config(path) or {}
        current = ckpt.run_config(cfg)
        differences = ckpt.run_config_differences(
            path, {"model": current["model"], "mtp": {"num_depths": cfg.mtp.num_depths}}
        )
        # Only the model and the number of depths bind the weights; λ, data and the rest may change.
        differences = [d for d in differences if d.startswith(("model.", "mtp.num_depths="))]
        if stored and differences:
            raise ResumeMismatchError(
                f"error: training.pretrained_checkpoint {path} holds another model: "
                + "; ".join(differences)
                + " (checkpoint vs this run); use the checkpoint's model settings"
            )
        return path

    def _broadcast_output_dirs(self) -> None:
        # Each torchrun rank composed its own config; time-stamped Hydra directories can differ by a
        # second between ranks, and all ranks must write one checkpoint. Rank 0's paths win.
        tr = self.cfg.training
        paths = [tr.save_dir, tr.load_dir, tr.tensorboard_dir]
        torch.distributed.broadcast_object_list(paths, src=0)
        tr.save_dir, tr.load_dir, tr.tensorboard_dir = paths

    def _check_expert_layout(self, saved: dict[str, int] | None) -> None:
        # Megatron gives expert parameters an optimizer of their own only when ep > 1; a checkpoint's
        # chained optimizer state does not load into the other structure (its param groups come back empty).
        now = self.cfg.parallel.expert_model_parallel_size
        if saved and self.cfg.model.is_moe and (saved["expert_model_parallel_size"] > 1) != (now > 1):
            was = saved["expert_model_parallel_size"]
            raise ResumeMismatchError(
                f"error: {self.resume_from} was written with parallel.expert_model_parallel_size={was}; "
                f"Megatron keeps expert parameters in an optimizer of their own only when it is > 1, so that "
                f"optimizer state cannot be resharded to expert_model_parallel_size={now}; resume with "
                + ("an expert_model_parallel_size > 1" if was > 1 else "expert_model_parallel_size=1")
            )

    def _layout(self) -> dict[str, int]:
        par = self.cfg.parallel
        return {
            "world_size": self.world_size,
            "tensor_model_parallel_size": par.tensor_model_parallel_size,
            "pipeline_model_parallel_size": par.pipeline_model_parallel_size,
            "expert_model_parallel_size": par.expert_model_parallel_size,
        }

    def _maybe_resume(self) -> None:
        path = self.resume_from
        if path is None:
            if self.start_from is not None:
                ckpt.load_model_weights(self.start_from, model=self.model)
                # DDP keeps fp32 main params beside bf16 weights: the optimizer copies them from the model.
                self.optimizer.reload_model_params()
                if self.is_logging_rank:
                    self._print(f" started from the weights of {self.start_from} (optimizer and data fresh)")
            return
        saved_layout = ckpt.saved_layout(path)
        # Per-rank RNG streams belong to the rank layout that drew them; under another layout (Megatron
        # dist_checkpointing reshards model and optimizer) they are skipped, as Megatron-LM's --no-load-rng.
        load_rng = saved_layout is None or saved_layout == self._layout()
        common = ckpt.load_checkpoint(path, model=self.model, optimizer=self.optimizer, load_rng=load_rng)
        if common.get(ckpt.WEIGHTS_ONLY):
            if self.is_logging_rank:
                self._print(f" started from the weights in {path} (fresh optimizer, iteration 0)")
            return
        self.scheduler.load_state_dict(common["scheduler"])
        self.iteration = int(common["iteration"])
        self.consumed_samples = int(common["consumed_samples"])
        lambda_note = self._resume_lambda(common.get("lambda_schedule"))
        if not self.is_logging_rank:
            return
        self._print(
            f" loaded checkpoint {path} at iteration {self.iteration} (consumed tokens {self.consumed_tokens})"
        )
        if not load_rng:
            layout = ", ".join(f"{k} {saved_layout[k]} -> {v}" for k, v in self._layout().items())
            self._print(f" parallel layout changed ({layout}): resharded; RNG states not loaded")
        tr, saved = self.cfg.training, common["scheduler"]
        changed = [
            f"training.{name} {saved[key]} -> {now}"
            for name, key, now in (
                ("train_iters", "lr_decay_steps", tr.train_iters),
                ("lr", "max_lr", tr.lr),
                ("min_lr", "min_lr", tr.min_lr),
                ("lr_warmup_iters", "lr_warmup_steps", tr.lr_warmup_iters),
                ("lr_decay_style", "decay_style", tr.lr_decay_style),
            )
            if key in saved and saved[key] != now
        ]
        if changed:
            # What the optimizer's param groups hold now, every group: the lr the next step applies.
            lrs = ", ".join(f"{lr:.4g}" for lr in sorted({g["lr"] for g in self.optimizer.param_groups}))
            self._print(
                f" lr schedule re-derived from this run's settings ({'; '.join(changed)}): lr {lrs} at "
                f"iteration {self.iteration + 1}"
            )
        if lambda_note:
            self._print(lambda_note)

    def _resume_lambda(self, saved: dict | None) -> str:
        """Re-derive a run-relative λ switch on resume (the run's length changed; `_find_resume` refused any
        other change): switches the checkpoint had passed stay passed, the others move with the run.
        Returns the line saying so ("" when the schedule is the checkpoint's)."""
        if saved is None:
            return ""
        old = schedule_from_state_dict(saved)
        new = self.schedule
        if type(old) is not type(new) or schedule_state_dict(old) == schedule_state_dict(new):
            return ""
        tokens = self.consumed_tokens
        self.schedule = keep_passed_switches(old, new, tokens)
        per_iteration = self.cfg.tokens_per_iteration

        def at(point: float) -> str:
            return f"{point:,.0f} tokens (iteration {first_iteration_at(point, per_iteration)})"

        labels = {
            "boundaries_tokens": "the switch",
            "start_tokens": "the ramp's start",
            "end_tokens": "its end",
        }
        moves = []
        for name, was in switch_points(old).items():
            wanted, now = switch_points(new)[name], switch_points(self.schedule)[name]
            for i, (a, b, c) in enumerate(zip(was, wanted, now, strict=True)):
                label = labels[name] + (f" {i + 1}" if len(was) > 1 else "")
                if a == c and a != b:
                    moves.append(
                        f"{label} at {at(a)} has passed and stays passed (this run's length would put it "
                        f"at {at(b)})"
                    )
                elif a != c:
                    moves.append(f"{label} moves from {at(a)} to {at(c)}")
        return (
            f" λ switch re-derived from this run's length (training.train_iters {self.cfg.training.train_iters}, "
            f"{self.cfg.training.train_iters * per_iteration:,} tokens; {tokens:,} consumed): "
            + "; ".join(moves)
        )

    @property
    def consumed_tokens(self) -> int:
        return self.consumed_samples * self.cfg.model.seq_length

    # ------------------------------------------------------------------ steps

    def _forward_backward(self, dataset, metrics, first_sample: int, lam: float, forward_only: bool):
        from megatron.core.pipeline_parallel import get_forward_backward_func

        from mtp_plugin.megatron.step import global_target_counts

        tr = self.cfg.training
        batches = train_data.micro_batches(
            dataset,
            first_sample=first_sample,
            global_batch_size=tr.global_batch_size,
            micro_batch_size=tr.micro_batch_size,
            dp_rank=self.dp_rank,
            dp_size=self.dp_size,
            device=self.device,
        )
        # The loss follows the schedule's mode; per-token mode divides depth k by its global target count.
        per_token, counts = self.tf_config.calculate_per_token_loss, None
        if per_token and self.cfg.mtp.enabled:
            batches = list(batches)
            counts = global_target_counts(
                batches, self.cfg.mtp.num_depths, self.dp_group, eod_id=self.model.eod_id
            )
            batches = iter(batches)
        step = functools.partial(
            mtp_forward_step,
            metrics=metrics,
            lam=lam,
            depth_weights=self.cfg.mtp.weights or None,
            per_token_loss=per_token,
            global_counts=counts,
        )
        get_forward_backward_func()(
            forward_step_func=step,
            data_iterator=batches,
            model=[self.ddp],
            num_microbatches=self.num_micro_batches,
            seq_length=self.cfg.model.seq_length,
            micro_batch_size=tr.micro_batch_size,
            forward_only=forward_only,
        )

    def _local_nonfinite(self, metrics) -> list[str]:
        """Names of this rank's non-finite per-depth losses this step (empty off the last stage)."""
        if not self.is_last_stage:
            return []
        sums = [metrics.main_loss_sum, *metrics.depth_loss_sums]
        names = ["lm loss"] + [f"mtp_{k} loss" for k in range(1, self.cfg.mtp.num_depths + 1)]
        return [name for name, value in zip(names, sums) if not math.isfinite(value)]

    def _nonfinite_losses(self, metrics) -> str:
        """ "rank 0: mtp_2 loss; ..." naming every rank's non-finite losses this step, or "" (all ranks)."""
        bad = self._local_nonfinite(metrics)
        # On the run's device: NCCL has no CPU backend ("No backend type associated with device type cpu").
        flag = torch.tensor([1.0 if bad else 0.0], device=self.device)
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        if flag.item() == 0:
            return ""
        reports: list[list[str] | None] = [None] * self.world_size
        torch.distributed.all_gather_object(reports, bad)
        return "; ".join(f"rank {r}: {', '.join(names)}" for r, names in enumerate(reports) if names)

    def _last_checkpoint_note(self) -> str:
        save_dir = self.cfg.training.save_dir
        if not save_dir:
            return "no checkpoint is written (training.save_dir=null)"
        try:
            path = ckpt.latest_checkpoint(save_dir)
        except FileNotFoundError:
            path = None
        if path is None:
            return f"no checkpoint was written yet in {save_dir}"
        return f"the last checkpoint {path.name} is untouched (rerun to resume from it)"

    def _check_finite(self, metrics, what: str) -> None:
        where = self._nonfinite_losses(metrics)
        if where:
            raise NonFiniteLossError(
                f"iteration {self.iteration}: non-finite {what} loss ({where}); nothing was saved; "
                f"{self._last_checkpoint_note()}; lower training.lr"
            )

    def _clip_hint(self) -> str:
        """' or set training.clip_grad' where clipping is available and off (Megatron's clip needs CUDA:
        a CPU run refuses it at launch, so it is no advice there)."""
        usable = self.device.type == "cuda" or self.cfg.backend.name == "deepspeed"
        return " or set training.clip_grad" if usable and not self.cfg.training.clip_grad else ""

    def _nonfinite_step(self, where: str, grad_norm: float, lam: float) -> dict[str, float]:
        """The update is not applied: stop (raise) or, with training.nonfinite=skip, count the iteration."""
        tr = self.cfg.training
        what = f"non-finite loss ({where}), grad norm {grad_norm}" if where else f"grad norm {grad_norm}"
        self.skips_in_a_row += 1
        if tr.nonfinite == "stop" or self.skips_in_a_row >= MAX_SKIPS_IN_A_ROW:
            why = "" if tr.nonfinite == "stop" else f" ({self.skips_in_a_row} skipped in a row)"
            raise NonFiniteLossError(
                f"iteration {self.iteration + 1}: {what}{why}; the update was not applied and nothing was "
                f"saved; {self._last_checkpoint_note()}; lower training.lr{self._clip_hint()}"
                + (
                    ", or training.nonfinite=skip to step over such iterations"
                    if tr.nonfinite == "stop"
                    else ""
                )
            )
        # As Megatron-LM's skipped iterations: the data is consumed, the lr schedule does not advance.
        lr = self.optimizer.param_groups[0]["lr"]
        self.iteration += 1
        self.consumed_samples += tr.global_batch_size
        self.result.skipped_iterations += 1
        if self.is_logging_rank:
            self._print(
                f" iteration {self.iteration}: {what}; update skipped (training.nonfinite=skip, "
                f"{self.skips_in_a_row} in a row)"
            )
        return {"mtp lambda": lam, "learning rate": lr, "grad norm": grad_norm, "skipped": 1.0}

    def train_step(self) -> dict[str, float]:
        """One optimizer step; returns the step's reduced metrics on last-stage ranks (else {})."""
        tr = self.cfg.training
        lam = self.schedule(self.consumed_tokens)
        self.ddp.zero_grad_buffer()
        self.optimizer.zero_grad()
        self.metrics.reset()
        self._forward_backward(self.train_ds, self.metrics, self.consumed_samples, lam, forward_only=False)
        where = self._nonfinite_losses(self.metrics)
        # Megatron's optimizer.step() computes the grad norm and applies the update in one call, so the norm
        # is taken first, as step() takes it: prepare_grads() copies the reduced grads into the optimizer's
        # main grads (only a copy without a loss scaler, which fp32 and bf16 runs do not have, so step()
        # doing it again is harmless); get_grad_norm() reduces over the model-parallel ranks (and the data-
        # parallel ones under the distributed optimizer): every rank gets the same value.
        self.optimizer.prepare_grads()
        grad_norm = float(self.optimizer.get_grad_norm())
        self.rho_meter.end_step()
        if where or not math.isfinite(grad_norm):
            return self._nonfinite_step(where, grad_norm, lam)
        self.skips_in_a_row = 0
        self.window_metrics.merge(self.metrics)
        update_successful, _, _ = self.optimizer.step()
        assert update_successful, "Megatron's optimizer skipped a step with a finite grad norm"
        lr = self.optimizer.param_groups[0]["lr"]
        self.scheduler.step(increment=1)
        self.iteration += 1
        self.consumed_samples += tr.global_batch_size
        values = self.metrics.reduce(self.dp_group) if self.is_last_stage else {}
        return {**values, "mtp lambda": lam, "learning rate": lr, "grad norm": float(grad_norm)}

    def evaluate(self) -> dict[str, float]:
        """Forward-only pass over the fixed validation batches; returns reduced metrics on the last stage."""
        if self.valid_ds is None:
            return {}
        self.ddp.eval()
        self.valid_metrics.reset()
        lam = self.schedule(self.consumed_tokens)
        with torch.no_grad():
            for i in range(self.cfg.training.eval_iters):
                first = i * self.cfg.training.global_batch_size
                self._forward_backward(self.valid_ds, self.valid_metrics, first, lam, forward_only=True)
        self.ddp.train()
        self._check_finite(self.valid_metrics, "validation")
        return self.valid_metrics.reduce(self.dp_group) if self.is_last_stage else {}

    def save(self) -> Path:
        path = ckpt.save_checkpoint(
            self.cfg.training.save_dir,
            self.iteration,
            model=self.model,
            optimizer=self.optimizer,
            common={
                "scheduler": self.scheduler.state_dict(),
                "consumed_samples": self.consumed_samples,
                "consumed_tokens": self.consumed_tokens,
                "lambda_schedule": schedule_state_dict(self.schedule),
                "lambda": self.schedule(self.consumed_tokens),
                "config": asdict(self.cfg),
                "layout": self._layout(),
            },
            run_config=ckpt.run_config(self.cfg),
            keep_last=self.cfg.training.keep_last_checkpoints,
        )
        return self._saved(path)

    def _saved(self, path: Path) -> Path:
        self.result.last_checkpoint = str(path)
        if self.is_logging_rank:
            self._print(f" saved checkpoint {path} at iteration {self.iteration}")
        return path

    # ------------------------------------------------------------------ the run

    def _progress_bar(self):
        mode = self.cfg.training.progress_bar
        show = mode == "on" or (mode == "auto" and sys.stdout.isatty())
        if not (show and self.is_logging_rank):
            return None
        from tqdm import tqdm

        return tqdm(
            total=self.cfg.training.train_iters,
            initial=self.iteration,
            unit="it",
            dynamic_ncols=True,
            leave=False,
        )

    def _agreed_signal(self, signals: ExitSignals) -> int:
        """The exit signal any rank received (0: none), agreed by one all-reduce on the run's device, as
        Megatron-LM's DistributedSignalHandler does each iteration."""
        flag = torch.tensor([float(signals.received or 0)], device=self.device)
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        return int(flag.item())

    def train(self, *, stop_at: int | None = None) -> TrainResult:
        """Train to `training.train_iters`, or stop after iteration `stop_at` (saving there if a
        save_dir is set), e.g. to end within a job's time limit and resume in the next job. One of
        `training.exit_signals` ends the run after its current iteration the same way and sets
        `result.stop_signal`."""
        tr = self.cfg.training
        end = tr.train_iters if stop_at is None else min(stop_at, tr.train_iters)
        first_iteration, skipped_before = self.iteration, self.result.skipped_iterations
        metric_names = logs.metric_names(self.cfg.mtp.num_depths)
        if self.iteration >= tr.train_iters and self.is_logging_rank:
            self._print(
                f" nothing to train: {self.resume_from} is at iteration {self.iteration} of "
                f"training.train_iters={tr.train_iters}; nothing was saved (raise training.train_iters to go on)"
            )
        # Rows after the checkpoint this run resumed from belong to a process that died before saving them.
        writer = logs.ScalarWriter(
            tr.tensorboard_dir if self.is_logging_rank else None, purge_step=self.iteration + 1
        )
        logs.startup(
            self._print, self.is_logging_rank, f"starting training at iteration {self.iteration} of {end}"
        )
        bar = self._progress_bar()
        self.result.start_iteration, self.result.start_tokens = self.iteration, self.consumed_tokens
        # Without a progress bar (output not on a terminal) the iterations before the first log line would
        # pass in silence (a minute or more on CPU): one line per iteration until then.
        quiet_until = (
            min(end, (self.iteration // tr.log_interval + 1) * tr.log_interval)
            if bar is None and self.is_logging_rank and tr.log_interval > 1
            else self.iteration
        )
        start = time.perf_counter()
        interval: list[dict[str, float]] = []
        interval_start = time.perf_counter()
        last_eval = last_save = -1
        stop_signal = 0
        try:
            with ExitSignals(tr.exit_signals, self._print) as signals:
                while self.iteration < end:
                    stop_signal = self._agreed_signal(signals)
                    if stop_signal:
                        break
                    step_start = time.perf_counter()
                    step = self.train_step()
                    if self.iteration < quiet_until:
                        self._progress_line(step, time.perf_counter() - step_start, quiet_until, end)
                    if not step.get("skipped"):
                        interval.append(step)
                    if self.is_logging_rank and not step.get("skipped"):
                        self.result.train_history.append({"iteration": float(self.iteration), **step})
                        writer.add(
                            {
                                k: step[k]
                                for k in (*metric_names, "mtp lambda", "learning rate", "grad norm")
                                if k in step
                            },
                            self.iteration,
                        )
                    if bar is not None:
                        bar.update(1)
                        if "lm loss" in step:
                            bar.set_postfix_str(f"lm loss {step['lm loss']:.3f}")
                    if self.iteration % tr.log_interval == 0 or self.iteration == tr.train_iters:
                        elapsed = time.perf_counter() - interval_start
                        # Every rank joins the meter's one all-reduce; only the logging rank prints.
                        rho = self.rho_meter.reduce(metrics=self.window_metrics, elapsed_s=elapsed)
                        self.rho_meter.reset()
                        self.window_metrics.reset()
                        if self.is_logging_rank:
                            rho_fields = {k: rho[k] for k in RHO_LOG_FIELDS if k in rho}
                            writer.add(rho_fields, self.iteration)
                            self.result.rho_history.append({"iteration": float(self.iteration), **rho})
                        else:
                            rho_fields = {}
                        self._log_interval(interval, elapsed, metric_names, bar, rho_fields)
                        interval, interval_start = [], time.perf_counter()
                    if tr.eval_interval and self.iteration % tr.eval_interval == 0:
                        self._run_eval(writer, bar)
                        last_eval = self.iteration
                    if tr.save_interval and self.iteration % tr.save_interval == 0:
                        self.save()
                        last_save = self.iteration
                    if tr.exit_interval and self.iteration % tr.exit_interval == 0 and self.iteration < end:
                        if self.is_logging_rank:
                            self._emit(
                                f" exiting at iteration {self.iteration} (training.exit_interval="
                                f"{tr.exit_interval}); run the same command without it to resume",
                                bar,
                            )
                        break
                trained = self.iteration > first_iteration
                if (
                    tr.eval_interval
                    and last_eval != self.iteration
                    and self.iteration == tr.train_iters
                    and trained
                ):
                    self._run_eval(writer, bar)
                # A resume with nothing left to train must not rewrite the checkpoint it loaded.
                if tr.save_dir and last_save != self.iteration and trained:
                    self.save()
                if stop_signal:
                    self._report_signal(stop_signal, bar)
        finally:
            if bar is not None:
                bar.close()
            writer.close()
        self.result.iterations = self.iteration
        self.result.consumed_tokens = self.consumed_tokens
        self.result.wall_s = time.perf_counter() - start
        self.result.peak_memory_gib = self._peak_memory_gib()
        if self.is_logging_rank and self.result.peak_memory_gib is not None:
            self._print(
                f" peak memory {self.result.peak_memory_gib:.2f} GiB allocated on "
                f"{torch.cuda.get_device_name(self.device)} (torch.cuda.max_memory_allocated)"
            )
        skipped = self.result.skipped_iterations - skipped_before
        if self.is_logging_rank and skipped:
            # Exit 0 with skipped updates must still say so at the end, not only in lines scrolled past.
            self._print(
                f" {skipped} of {self.iteration - first_iteration} iterations skipped their update "
                "(non-finite loss or grad norm; training.nonfinite=skip)"
            )
        if self.is_logging_rank and tr.tensorboard_dir and self.result.train_history:
            # The whole run's history (every process that trained it), not only this process's iterations.
            train_rows, valid_rows = logs.histories_from_scalars(
                logs.read_scalars(Path(tr.tensorboard_dir) / logs.ScalarWriter.JSONL_NAME)
            )
            path = logs.plot_loss_curves(
                train_rows, valid_rows, self.cfg.mtp.num_depths, Path(tr.tensorboard_dir) / "loss_curves.png"
            )
            self.result.plot_path = str(path)
            self._print(f" wrote per-depth loss curves to {path}")
        return self.result

    def _progress_line(self, step: dict[str, float], seconds: float, first_log: int, end: int) -> None:
        loss = f", lm loss {step['lm loss']:.4f}" if "lm loss" in step else ""
        until = (
            f"; a log line every {self.cfg.training.log_interval} iterations (training.log_interval), the first at {first_log}"
            if self.iteration == self.result.start_iteration + 1
            else ""
        )
        logs.startup(
            self._print, True, f"iteration {self.iteration} of {end} took {seconds:.1f} s{loss}{until}"
        )

    def _report_signal(self, signum: int, bar) -> None:
        name = signal.Signals(signum).name
        self.result.stop_signal = name
        if not self.is_logging_rank:
            return
        if not self.cfg.training.save_dir:
            where = "no checkpoint saved (training.save_dir=null)"
        elif self.result.last_checkpoint is None:
            where = f"nothing trained since {self.resume_from or 'the start'}; nothing saved"
        else:
            where = f"checkpoint {self.result.last_checkpoint}"
        self._emit(
            f" {name} received: stopped after iteration {self.iteration}; {where}; exit code {EXIT_SIGNAL} "
            "(rerun the same command to resume)",
            bar,
        )

    def report_startup_signal(self, signum: int) -> None:
        """An exit signal arrived before the first iteration: say so (nothing trained, nothing saved)."""
        self.result.stop_signal = signal.Signals(signum).name
        if self.is_logging_rank:
            self._print(
                f" {self.result.stop_signal} received during start-up: stopped before training iteration "
                f"{self.iteration + 1}; nothing saved; exit code {EXIT_SIGNAL} (rerun the same command to start)"
            )

    def _emit(self, line: str, bar) -> None:
        if bar is not None:
            bar.write(line)
            logs.to_file(self._print, line)  # <run dir>/train.log gets the lines a progress bar printed
        else:
            self._print(line)

    def _peak_memory_gib(self) -> float | None:
        """Most GPU memory this process's tensors have held so far (None on CPU)."""
        if self.device.type != "cuda":
            return None
        return torch.cuda.max_memory_allocated(self.device) / 2**30

    def _log_interval(self, interval, elapsed_s: float, metric_names, bar, rho_fields) -> None:
        if not self.is_logging_rank or not interval:
            return
        n = len(interval)
        averaged = {k: sum(s[k] for s in interval) / n for k in metric_names if k in interval[-1]}
        tokens = n * self.cfg.tokens_per_iteration
        line = logs.format_train_line(
            iteration=self.iteration,
            train_iters=self.cfg.training.train_iters,
            consumed_tokens=self.consumed_tokens,
            ms_per_iter=1000.0 * elapsed_s / n,
            tokens_per_second=tokens / max(elapsed_s, 1e-9),
            lr=interval[-1]["learning rate"],
            global_batch_size=self.cfg.training.global_batch_size,
            metrics={**averaged, **rho_fields},
            lam=interval[-1]["mtp lambda"],
            grad_norm=interval[-1]["grad norm"],
            peak_memory_gib=self._peak_memory_gib(),
        )
        self._emit(line, bar)

    def _run_eval(self, writer, bar) -> None:
        values = self.evaluate()
        if self.is_logging_rank and values:
            self.result.valid_history.append({"iteration": float(self.iteration), **values})
            writer.add(values, self.iteration, suffix=" validation")
            self._emit(logs.format_validation_line(self.iteration, values), bar)

    def close(self) -> None:
        from megatron.core import parallel_state as ps

        ps.destroy_model_parallel()


# ---------------------------------------------------------------------- launch


def use_deterministic_kernels() -> None:
    """Bit-reproducible runs, as Megatron-LM's `--deterministic-mode` sets them up (megatron/training/
    determinism.py): deterministic torch kernels (e.g. index_add / scatter_add in the MoE token permutation
    instead of atomics), cuBLAS's fixed workspace, NCCL's ring all-reduce. Process-wide torch state; call
    before the first cuBLAS handle and NCCL communicator exist. Ops without a deterministic kernel warn
    (torch's warn_only) instead of stopping the run."""
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    os.environ.setdefault("NCCL_ALGO", "Ring")
    torch.use_deterministic_algorithms(True, warn_only=True)


def init_distributed() -> bool:
    """Initialise torch.distributed from torchrun's environment, or as a single process.

    NCCL when CUDA is present, gloo otherwise. Returns True if this call created the process group.
    """
    if torch.distributed.is_initialized():
        return False
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    if "WORLD_SIZE" in os.environ and "MASTER_ADDR" in os.environ:
        torch.distributed.init_process_group(backend)
    else:
        # A plain `python -m mtp_plugin.train`: a one-rank group over an in-memory store.
        torch.distributed.init_process_group(
            backend, store=torch.distributed.HashStore(), rank=0, world_size=1
        )
    return True


def world_size_from_env() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def run(
    cfg: ExperimentConfig, *, print_fn: Callable[[str], None] | None = None, trainer_cls: type | None = None
) -> TrainResult:
    """Train `cfg` in this process (one rank of a torchrun job, or alone), then tear down.

    trainer_cls: the backend's Trainer (default: this module's, Megatron-Core)."""
    created = init_distributed()
    trainer = (trainer_cls or Trainer)(cfg, print_fn=print_fn)
    try:
        # An exit signal during start-up (the model and dataset builds can take minutes) is kept until the
        # start-up is done, then stops the run before its first iteration, as one during training would.
        with ExitSignals(cfg.training.exit_signals, trainer._print) as signals:
            trainer.setup()
            startup_signal = trainer._agreed_signal(signals)
        if startup_signal:
            trainer.report_startup_signal(startup_signal)
            raise StoppedBeforeTraining(EXIT_SIGNAL)
        result = trainer.train()
    except ResumeMismatchError as err:
        _error_line(trainer, str(err))
        raise SystemExit(2) from None
    except NonFiniteLossError as err:
        _error_line(trainer, f"error: {err}")
        raise SystemExit(EXIT_NONFINITE) from None
    except ckpt.CheckpointWriteError as err:
        _error_line(trainer, f"error: {err}")
        raise SystemExit(EXIT_SAVE_FAILED) from None
    finally:
        trainer.close()
        if created:
            torch.distributed.destroy_process_group()
    if result.stop_signal:
        raise SystemExit(EXIT_SIGNAL)
    return result


def _error_line(trainer: Trainer, line: str) -> None:
    if trainer.is_logging_rank:
        print(line, file=sys.stderr, flush=True)
