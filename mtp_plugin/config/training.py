"""Training run, data and backend settings, and the experiment that composes every group.

`ExperimentConfig` is what `python -m mtp_plugin.train` builds from Hydra's composed YAML; its
`__post_init__` checks the groups against each other so that a bad combination fails before any
process group or model exists. Checks that need the launch (world size, files on disk) are methods the
entry point calls before it initialises torch.distributed.
"""

from __future__ import annotations

import os
import signal
from dataclasses import dataclass, field

from mtp_plugin.config.checks import check_finite
from mtp_plugin.config.cluster import ClusterConfig
from mtp_plugin.config.model import ModelConfig
from mtp_plugin.config.mtp import MTPConfig
from mtp_plugin.config.parallel import ParallelConfig

LR_DECAY_STYLES = ("constant", "linear", "cosine")
BACKENDS = ("megatron", "deepspeed")


@dataclass(kw_only=True)
class TrainingConfig:
    """Optimisation, evaluation, logging and checkpoint settings of one run (the `training/` group).

    Steps are optimizer steps (iterations); one iteration consumes `global_batch_size` sequences, split
    into micro-batches of `micro_batch_size` per data-parallel rank.
    lr schedule: linear warmup from 0 over `lr_warmup_iters`, then `lr_decay_style` down to `min_lr` at
      `train_iters` (Megatron's OptimizerParamScheduler, counted in iterations).
    clip_grad: global gradient-norm clip; 0 disables it. Megatron's clip asserts CUDA tensors, so a CPU
      run must use 0 (the grad norm is still logged).
    eval_interval / save_interval / log_interval: every N iterations; 0 disables (eval and save also run
      once at the end when enabled). eval_iters: global batches of the validation split per evaluation.
    exit_interval: stop after an iteration divisible by N (saving there when save_dir is set), e.g. to end
      within a job's time limit; the same command without it resumes (Megatron-LM's --exit-interval). 0: off.
    save_dir / load_dir: checkpoint directories (None: no save / no resume). load_dir may equal save_dir;
      a missing `latest` pointer there means "start fresh". Any other load_dir (outside the run
      directory) is a checkpoint to start from: it must exist and hold `latest`. Both are checked, and
      save_dir probed for writing, before the run starts.
    pretrained_checkpoint: a finished checkpoint of this app (a save_dir holding `latest`, or one iter_*
      directory) whose model weights start the run when load_dir holds no checkpoint to resume
      (Megatron-LM's --pretrained-checkpoint): the optimizer, iteration and data position start fresh, so
      the MTP and data settings may differ from the checkpoint's (fine-tuning, refreshing the depths);
      the model settings and the number of depths must match.
    tensorboard_dir: TensorBoard event files, their exact values as `scalars.jsonl`, and the per-depth loss
      plot (None: none of them).
    progress_bar: "auto" (a tqdm bar when stdout is a terminal), "on", or "off".
    peak_tflops_per_device: the accelerator's peak (e.g. 989 for an H100's dense bf16) for MFU in the log
      line; 0 leaves MFU out.
    nonfinite: what a NaN/Inf loss (any depth) or grad norm does; the update is never applied either way.
      "stop": end the run (exit code 4) with the last checkpoint untouched (Megatron-LM's
      --check-for-nan-in-loss-and-grad); "skip": count the iteration without updating (as Megatron-LM's
      loss scaler skips overflowing steps), stopping after 10 skips in a row.
    exit_signals: signals that make the run finish its iteration, save, and exit with code 3 (rerun the same
      command to resume); a second one aborts at once (Megatron-LM's --exit-signal-handler), except the same
      signal within a second of the first (Slurm signals every process and launchers forward it too). []: none.
    keep_last_checkpoints: keep only the newest N finished checkpoints under save_dir; 0 keeps all.
    """

    train_iters: int = 100
    global_batch_size: int = 8
    micro_batch_size: int = 4
    lr: float = 1e-3
    min_lr: float = 1e-4
    lr_warmup_iters: int = 10
    lr_decay_style: str = "cosine"
    weight_decay: float = 0.1
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    adam_eps: float = 1e-8
    clip_grad: float = 0.0
    eval_interval: int = 50
    eval_iters: int = 2
    log_interval: int = 10
    save_interval: int = 0
    exit_interval: int = 0
    save_dir: str | None = None
    load_dir: str | None = None
    pretrained_checkpoint: str | None = None
    seed: int = 1234
    tensorboard_dir: str | None = None
    progress_bar: str = "auto"
    peak_tflops_per_device: float = 0.0
    nonfinite: str = "stop"
    exit_signals: list[str] = field(default_factory=lambda: ["SIGTERM", "SIGINT", "SIGUSR1"])
    keep_last_checkpoints: int = 0

    def __post_init__(self) -> None:
        check_finite(self, "training")
        for name in ("train_iters", "global_batch_size", "micro_batch_size", "log_interval"):
            if getattr(self, name) < 1:
                raise ValueError(f"training.{name} must be >= 1, got {getattr(self, name)}")
        if not self.lr > 0:
            raise ValueError(f"training.lr must be > 0, got {self.lr}")
        for name in ("lr_warmup_iters", "eval_interval", "eval_iters", "save_interval", "exit_interval"):
            if getattr(self, name) < 0:
                raise ValueError(f"training.{name} must be >= 0 (0 disables it), got {getattr(self, name)}")
        if self.global_batch_size % self.micro_batch_size:
            raise ValueError(
                f"training.global_batch_size={self.global_batch_size} must be a multiple of "
                f"training.micro_batch_size={self.micro_batch_size}; change one of them"
            )
        if not 0 <= self.min_lr <= self.lr:
            raise ValueError(f"training.min_lr={self.min_lr} must be in [0, training.lr={self.lr}]")
        if self.lr_warmup_iters >= self.train_iters:
            raise ValueError(
                f"training.lr_warmup_iters={self.lr_warmup_iters} must be below training.train_iters="
                f"{self.train_iters}; shorten the warmup"
            )
        if self.lr_decay_style not in LR_DECAY_STYLES:
            raise ValueError(
                f"training.lr_decay_style={self.lr_decay_style!r} is unknown; use one of {LR_DECAY_STYLES}"
            )
        for name in ("weight_decay", "clip_grad", "peak_tflops_per_device"):
            if getattr(self, name) < 0:
                raise ValueError(f"training.{name} must be >= 0, got {getattr(self, name)}")
        for name in ("adam_beta1", "adam_beta2"):
            # Adam divides by 1 - beta^t: beta = 1 never leaves its first value, above 1 diverges.
            if not 0 <= getattr(self, name) < 1:
                raise ValueError(f"training.{name} must be in [0, 1), got {getattr(self, name)}")
        if not self.adam_eps > 0:
            raise ValueError(f"training.adam_eps must be > 0, got {self.adam_eps}")
        if self.eval_interval and not self.eval_iters:
            raise ValueError("training.eval_interval > 0 needs training.eval_iters >= 1 (or eval_interval=0)")
        if self.save_interval and not self.save_dir:
            raise ValueError("training.save_interval > 0 needs training.save_dir (or save_interval=0)")
        if self.progress_bar not in ("auto", "on", "off"):
            raise ValueError(f"training.progress_bar={self.progress_bar!r}; use auto, on or off")
        if self.nonfinite not in ("stop", "skip"):
            raise ValueError(f"training.nonfinite={self.nonfinite!r}; use stop or skip")
        unknown = [
            name
            for name in self.exit_signals
            if not isinstance(getattr(signal, str(name), None), signal.Signals)
        ]
        if unknown:
            raise ValueError(
                f"training.exit_signals: unknown signal(s) {unknown}; use names like SIGTERM, SIGUSR1"
            )
        if self.keep_last_checkpoints < 0:
            raise ValueError(
                f"training.keep_last_checkpoints must be >= 0 (0 keeps all), got {self.keep_last_checkpoints}"
            )

    def num_micro_batches(self, data_parallel_size: int) -> int:
        per_step = self.micro_batch_size * data_parallel_size
        if self.global_batch_size % per_step:
            raise ValueError(
                f"training.global_batch_size={self.global_batch_size} must be divisible by "
                f"training.micro_batch_size={self.micro_batch_size} x data parallel size "
                f"{data_parallel_size} = {per_step}; change the batch sizes or the parallel layout"
            )
        return self.global_batch_size // per_step


@dataclass(kw_only=True)
class DataConfig:
    """Megatron indexed datasets (`<prefix>.bin` + `<prefix>.idx`) read through Megatron's GPTDataset.

    Either one `prefix` split into train/valid/test by `split` (Megatron's "969,30,1" weights), or
    separate `train_prefix` and `valid_prefix` (what `python -m mtp_plugin.data prepare` writes).
    eod_id: the tokenizer's end-of-document id (GPT-2: 50256).
    reset_position_ids / reset_attention_mask: restart positions / attention at each EOD (per-document
      attention, "EOD reset"); eod_mask_loss: do not score predicting the token after an EOD.
    cache_dir: where GPTDataset writes its sample-index caches (None: beside the data).
    """

    prefix: str | None = None
    split: str = "969,30,1"
    train_prefix: str | None = None
    valid_prefix: str | None = None
    eod_id: int = 50256
    reset_position_ids: bool = False
    reset_attention_mask: bool = False
    eod_mask_loss: bool = False
    cache_dir: str | None = None

    def __post_init__(self) -> None:
        if self.prefix and (self.train_prefix or self.valid_prefix):
            raise ValueError(
                "data.prefix and data.train_prefix/valid_prefix are exclusive; give one prefix with data.split "
                "or a prefix per split"
            )
        if not self.prefix and not self.train_prefix:
            raise ValueError(
                "no dataset given: set data.prefix=PATH (split by data.split) or data.train_prefix=PATH "
                "(and data.valid_prefix); `python -m mtp_plugin.data prepare --out DIR` writes one"
            )
        if self.prefix:
            try:
                weights = [float(w) for w in self.split.split(",")]
            except ValueError:
                weights = []
            if len(weights) != 3 or any(w < 0 for w in weights) or not sum(weights) > 0:
                raise ValueError(
                    f"data.split={self.split!r} must be three non-negative weights like '969,30,1' "
                    "(train, valid, test)"
                )

    @property
    def prefixes(self) -> list[str]:
        return [p for p in (self.prefix, self.train_prefix, self.valid_prefix) if p]

    @property
    def has_validation(self) -> bool:
        if self.prefix:
            return float(self.split.split(",")[1]) > 0
        return self.valid_prefix is not None

    def check_files(self) -> None:
        """Raise a one-line error if a dataset prefix lacks its .bin or .idx file."""
        for name, prefix in (
            ("prefix", self.prefix),
            ("train_prefix", self.train_prefix),
            ("valid_prefix", self.valid_prefix),
        ):
            if not prefix:
                continue
            if prefix.endswith((".bin", ".idx")):
                raise FileNotFoundError(
                    f"data.{name}={prefix}: give the prefix without the extension, data.{name}={prefix[:-4]}"
                )
            # GPTDataset keeps its index caches in <prefix>/cache: a directory beside a real .bin is fine.
            if os.path.isdir(prefix) and not os.path.isfile(prefix + ".bin"):
                raise FileNotFoundError(
                    f"data.{name}={prefix} is a directory; give the prefix of its files, e.g. "
                    f"data.{name}={os.path.join(prefix, 'train_text_document')}"
                )
            for ext in (".bin", ".idx"):
                if not os.path.isfile(prefix + ext):
                    no_valid = name == "valid_prefix" and not os.path.exists(prefix + ".bin")
                    raise FileNotFoundError(
                        f"data.{name}={prefix}: {prefix}{ext} does not exist; run `make data` (or "
                        f"`python -m mtp_plugin.data prepare --out DIR`) or point data.{name} at an indexed dataset"
                        + (" (data.valid_prefix=null trains without validation)" if no_valid else "")
                    )


# BackendConfig fields only backend=deepspeed reads, with their defaults.
DEEPSPEED_ONLY_DEFAULTS = {
    "zero_stage": 1,
    "ds_config": None,
    "moe_capacity_factor": 0.0,
    "moe_min_capacity": 4,
}


@dataclass(kw_only=True)
class BackendConfig:
    """Which framework trains the model, and its numeric settings (the `backend/` group).

    params_dtype: "float32" or "bfloat16" (bf16 weights with fp32 main params and grads in the optimizer).
    use_distributed_optimizer: shard optimizer state across data-parallel ranks (Megatron's ZeRO-1).
    deterministic: bit-reproducible GPU runs (Megatron-LM's --deterministic-mode: deterministic torch
      kernels, cuBLAS's fixed workspace, NCCL rings); slower. CPU runs are deterministic without it.

    backend=deepspeed only (`mtp_plugin.deepspeed`):
    zero_stage: DeepSpeed ZeRO stage, 1 (optimizer state sharded over data-parallel ranks) or 0; the
      pipeline engine refuses 2 and 3.
    ds_config: a DeepSpeed JSON config whose keys override the generated one; keys that contradict the
      plugin's config (batch sizes, ZeRO stage, precision, gradient clipping) are refused, naming both values.
    moe_capacity_factor: DeepSpeed's MoE capacity factor; 0 routes every token to its k experts (dropless,
      as Megatron's default MoE), > 0 drops tokens beyond it. moe_min_capacity: DeepSpeed's min_capacity.
    """

    name: str = "megatron"
    params_dtype: str = "float32"
    use_distributed_optimizer: bool = False
    deterministic: bool = False
    zero_stage: int = 1
    ds_config: str | None = None
    moe_capacity_factor: float = 0.0
    moe_min_capacity: int = 4

    def __post_init__(self) -> None:
        check_finite(self, "backend")
        if self.name not in BACKENDS:
            raise ValueError(f"backend.name={self.name!r} is not available; use one of {BACKENDS}")
        if self.params_dtype not in ("float32", "bfloat16"):
            raise ValueError(f"backend.params_dtype={self.params_dtype!r}; use float32 or bfloat16")
        if self.name != "deepspeed":
            for field_name, default in DEEPSPEED_ONLY_DEFAULTS.items():
                if getattr(self, field_name) != default:
                    raise ValueError(
                        f"backend.{field_name}={getattr(self, field_name)!r} applies to backend=deepspeed only; "
                        f"drop it or use backend=deepspeed"
                    )
            return
        if self.use_distributed_optimizer:
            raise ValueError(
                "backend.use_distributed_optimizer is Megatron's; with backend=deepspeed set backend.zero_stage=1"
            )
        if self.zero_stage not in (0, 1):
            raise ValueError(
                f"backend.zero_stage={self.zero_stage}: DeepSpeed's pipeline engine supports ZeRO stage 0 or 1 "
                "only (ZeRO-2/3 partition gradients the pipeline schedule accumulates); use backend.zero_stage=1"
            )
        if self.moe_capacity_factor < 0:
            raise ValueError(
                f"backend.moe_capacity_factor={self.moe_capacity_factor} must be >= 0 (0 = dropless routing)"
            )
        if self.moe_min_capacity < 1:
            raise ValueError(f"backend.moe_min_capacity={self.moe_min_capacity} must be >= 1")
        if self.deterministic:
            raise ValueError(
                "backend.deterministic is Megatron-LM's --deterministic-mode; backend=deepspeed has no such "
                "switch here: drop it"
            )


@dataclass(kw_only=True)
class ExperimentConfig:
    """Everything one run needs; the groups are cross-checked on construction."""

    name: str = "experiment"
    model: ModelConfig = field(default_factory=ModelConfig)
    mtp: MTPConfig = field(default_factory=MTPConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    data: DataConfig = field(
        default_factory=lambda: DataConfig(train_prefix="data_cache/demo/train_text_document")
    )
    backend: BackendConfig = field(default_factory=BackendConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)

    def __post_init__(self) -> None:
        self.mtp.check_sequence_length(self.model.seq_length)
        if not 0 <= self.data.eod_id < self.model.vocab_size:
            raise ValueError(
                f"data.eod_id={self.data.eod_id} is outside the vocabulary [0, model.vocab_size={self.model.vocab_size}); "
                "set data.eod_id to the tokenizer's end-of-document id"
            )
        ep = self.parallel.expert_model_parallel_size
        if ep > 1 and not self.model.is_moe:
            raise ValueError(
                f"parallel.expert_model_parallel_size={ep} needs an MoE model (model.num_experts > 0); set it to 1"
            )
        if self.model.is_moe and self.model.num_experts % ep:
            raise ValueError(
                f"model.num_experts={self.model.num_experts} is not divisible by "
                f"parallel.expert_model_parallel_size={ep}; choose an expert-parallel size that divides it"
            )
        pp = self.parallel.pipeline_model_parallel_size
        # `stage` and `split` put the trunk on fewer stages; plan_pipeline checks those counts.
        trunk_on_all_stages = not self.mtp.enabled or self.mtp.placement == "last"
        if self.model.num_layers % pp and self.parallel.pipeline_layout is None and trunk_on_all_stages:
            raise ValueError(
                f"model.num_layers={self.model.num_layers} cannot be split evenly across "
                f"parallel.pipeline_model_parallel_size={pp} stages; choose a stage count that divides it or "
                "give the stages' layers in parallel.pipeline_layout (e.g. 'Et*4|t*4|...|tmL')"
            )
        if self.mtp.enabled and self.mtp.placement != "last" and (self.mtp.mtp_stage or 0) >= pp:
            raise ValueError(
                f"mtp.mtp_stage={self.mtp.mtp_stage} does not exist with {pp} pipeline stages; use a stage in [1, {pp})"
            )
        if self.mtp.trunk_gradients == "frozen":
            self._check_frozen_trunk()
        if self.parallel.context_parallel_size > 1 or self.parallel.tensor_model_parallel_size > 1:
            # Not a Megatron limit: the training loop does not yet shard batches over context parallel
            # ranks nor check tensor-parallel shapes.
            if self.parallel.context_parallel_size > 1:
                raise ValueError(
                    "parallel.context_parallel_size > 1 is not supported by the training loop yet; use 1"
                )
            if self.model.num_attention_heads % self.parallel.tensor_model_parallel_size:
                raise ValueError(
                    f"model.num_attention_heads={self.model.num_attention_heads} is not divisible by "
                    f"parallel.tensor_model_parallel_size={self.parallel.tensor_model_parallel_size}"
                )

    def _check_frozen_trunk(self) -> None:
        if not (self.training.pretrained_checkpoint or self.training.load_dir):
            raise ValueError(
                "mtp.trunk_gradients=frozen trains the depths on a finished trunk, and this run has none to "
                "start from; set training.pretrained_checkpoint=DIR (a checkpoint of the trained model)"
            )
        if self.parallel.pipeline_model_parallel_size > 1:
            raise ValueError(
                "mtp.trunk_gradients=frozen with parallel.pipeline_model_parallel_size > 1: the stages before "
                "the depths would have nothing to train or send a gradient to; use pipeline size 1"
            )
        if self.model.moe_router_enable_expert_bias:
            raise ValueError(
                "mtp.trunk_gradients=frozen with model.moe_router_enable_expert_bias: Megatron updates every "
                "router's balancing bias after each step, the frozen trunk's too; use trunk_gradients=detached"
            )

    def check_world_size(self, world_size: int) -> int:
        """Check the layout against the number of processes; return the data-parallel size."""
        dp = self.parallel.data_parallel_size(world_size)
        self.training.num_micro_batches(dp)
        return dp

    @property
    def tokens_per_iteration(self) -> int:
        return self.training.global_batch_size * self.model.seq_length

    def mtp_summary(self) -> str:
        """The MTP setup that will train, in one line (printed by `--cfg job` and at the start of a run)."""
        return self.mtp.describe(self.tokens_per_iteration, self.training.train_iters)
