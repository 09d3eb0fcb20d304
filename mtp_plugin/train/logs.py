"""Per-interval log lines in Megatron-LM's layout, their parser, the run's log file, TensorBoard scalars
and the loss plot.

A training line (Megatron-LM `training_log`, with tokens instead of samples and the MTP fields):

     [2025-01-01 12:00:00] iteration       10/     100 | consumed tokens:        10240 | elapsed time per
     iteration (ms): 812.3 | tokens per second: 1260.6 | learning rate: 9.000000E-04 | global batch size:
     8 | lm loss: 7.123456E+00 | mtp_1 loss: 7.5E+00 | mtp_1 acceptance: 1.2E-02 | mtp lambda: 3.000000E-01
     | grad norm: 1.234 | peak memory (GiB): 23.45 |

(one line; the peak memory, torch.cuda.max_memory_allocated so far, on GPU only). A validation line:
` validation loss at iteration 10 | lm loss value: ... | lm loss PPL: ... | mtp_1 loss value: ... |
mtp_1 acceptance value: ... |`. Values are averaged over the log interval,
token-weighted, across data-parallel ranks.

Every line the app prints (start-up progress, these lines, checkpoints) also goes to `train.log` in the
run directory (`RunLog`).
"""

from __future__ import annotations

import json
import math
import os
import re
import time
from collections.abc import Mapping
from pathlib import Path

_ITER_RE = re.compile(r"iteration\s+(\d+)/\s*(\d+)")
_VALID_RE = re.compile(r"validation loss at iteration\s+(\d+)")


def metric_names(num_depths: int) -> list[str]:
    names = ["lm loss"]
    for k in range(1, num_depths + 1):
        names += [f"mtp_{k} loss", f"mtp_{k} acceptance"]
    if num_depths:
        names.append("mtp chain accept length")
    return names


def format_train_line(
    *,
    iteration: int,
    train_iters: int,
    consumed_tokens: int,
    ms_per_iter: float,
    tokens_per_second: float,
    lr: float,
    global_batch_size: int,
    metrics: Mapping[str, float],
    lam: float,
    grad_norm: float | None,
    peak_memory_gib: float | None = None,
) -> str:
    stamp = time.strftime("%Y-%m-%d %H:%M:%S")
    parts = [
        f" [{stamp}] iteration {iteration:8d}/{train_iters:8d}",
        f"consumed tokens: {consumed_tokens:12d}",
        f"elapsed time per iteration (ms): {ms_per_iter:.1f}",
        f"tokens per second: {tokens_per_second:.1f}",
        f"learning rate: {lr:.6E}",
        f"global batch size: {global_batch_size:5d}",
    ]
    parts += [f"{name}: {value:.6E}" for name, value in metrics.items()]
    parts.append(f"mtp lambda: {lam:.6E}")
    if grad_norm is not None:
        parts.append(f"grad norm: {grad_norm:.3f}")
    if peak_memory_gib is not None:
        # Megatron-LM reports it as "max allocated" in its memory line; here it joins the log line.
        parts.append(f"peak memory (GiB): {peak_memory_gib:.2f}")
    return " | ".join(parts) + " |"


def format_validation_line(iteration: int, metrics: Mapping[str, float]) -> str:
    parts = [f" validation loss at iteration {iteration}"]
    for name, value in metrics.items():
        parts.append(f"{name} value: {value:.6E}")
        if name == "lm loss":
            parts.append(f"lm loss PPL: {math.exp(min(20.0, value)):.6E}")
    return " | ".join(parts) + " |"


def parse_log_line(line: str) -> dict[str, float] | None:
    """Fields of a training or validation line as floats, or None for any other line.

    Training: {"iteration", "train iters", "consumed tokens", "elapsed time per iteration (ms)", ...,
    "lm loss", "mtp_1 loss", ...}. Validation: {"validation": 1.0, "iteration", "lm loss", "lm loss PPL",
    "mtp_1 loss", ...} (the " value" suffix dropped so that keys match the training line).
    """
    valid = _VALID_RE.search(line)
    train = None if valid else _ITER_RE.search(line)
    if not (valid or train):
        return None
    fields: dict[str, float] = {}
    if valid:
        fields["validation"] = 1.0
        fields["iteration"] = float(valid.group(1))
    else:
        fields["iteration"] = float(train.group(1))
        fields["train iters"] = float(train.group(2))
    for part in line.split(" | ")[1:]:
        key, sep, value = part.strip().rstrip("|").strip().rpartition(": ")
        if not sep:
            continue
        if key.endswith(" value"):
            key = key[: -len(" value")]
        try:
            fields[key] = float(value)
        except ValueError:
            continue
    return fields


TRAIN_LOG_NAME = "train.log"


class RunLog:
    """A `print_fn` for the trainer: prints each line (flushed) and appends it to `path`, e.g.
    `<run dir>/train.log`. The file is opened at the first line, so only the rank that prints (the
    logging rank) creates it and a run rejected before training leaves none."""

    def __init__(self, path: str | Path | None) -> None:
        self.path = None if path is None else Path(path)
        self._file = None

    def __call__(self, line: str) -> None:
        print(line, flush=True)
        self.write_file(line)

    def write_file(self, line: str) -> None:
        """Only the file (the console line went out through a progress bar's `write`)."""
        if self.path is None:
            return
        if self._file is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._file = open(self.path, "a", buffering=1)  # noqa: SIM115 - line-buffered, lives with the run
        self._file.write(line + "\n")


def to_file(print_fn, line: str) -> None:
    """Append `line` to the run's log file if `print_fn` is a `RunLog` (for lines printed another way)."""
    if isinstance(print_fn, RunLog):
        print_fn.write_file(line)


def startup(print_fn, enabled: bool, message: str) -> None:
    """A start-up progress line (`[time] building the model ...`), so the seconds before the first
    iteration line are not silent; `enabled` on the logging rank only."""
    if enabled:
        print_fn(f" [{time.strftime('%Y-%m-%d %H:%M:%S')}] {message}")


class ScalarWriter:
    """TensorBoard scalars (one tag per logged field) and the same values, exact, as JSON lines in
    `log_dir/scalars.jsonl` (TensorBoard keeps float32; scripts and tests compare runs bit for bit from the
    JSON: `{"step": 3, "lm loss": 6.21..., ...}`, one line per `add`). Nothing is written when no directory
    is given.

    Each `add` is flushed to the operating system at once (both files), so a process killed with SIGKILL
    loses no logged row. `purge_step`: the first step this process logs (a resume from iteration N passes
    N + 1); rows of earlier processes at or after it, logged by a run that died before its next checkpoint
    and trained again now, are dropped from scalars.jsonl, and TensorBoard hides their events (its own
    purge mechanism: a SessionLog START at purge_step), so the history equals an uninterrupted run's.
    """

    JSONL_NAME = "scalars.jsonl"

    def __init__(self, log_dir: str | None, *, purge_step: int | None = None) -> None:
        self._writer = None
        self._jsonl = None
        if log_dir:
            from torch.utils.tensorboard import SummaryWriter

            path = Path(log_dir) / self.JSONL_NAME
            stale = purge_step is not None and path.is_file()
            if stale:
                _drop_rows_from(path, purge_step)
            # Without earlier rows there is nothing to purge; TensorBoard would record a restart anyway.
            self._writer = SummaryWriter(log_dir=log_dir, purge_step=purge_step if stale else None)
            Path(log_dir).mkdir(parents=True, exist_ok=True)
            self._jsonl = open(path, "a")  # noqa: SIM115 - closed in close()

    def add(self, values: Mapping[str, float], step: int, *, suffix: str = "") -> None:
        if self._writer is None:
            return
        for name, value in values.items():
            self._writer.add_scalar(name + suffix, value, step)
        record = {"step": step, **{name + suffix: float(value) for name, value in values.items()}}
        self._jsonl.write(json.dumps(record) + "\n")
        self._jsonl.flush()
        self._writer.flush()

    def close(self) -> None:
        if self._writer is not None:
            self._writer.flush()
            self._writer.close()
            self._jsonl.close()


def _drop_rows_from(path: Path, first_step: int) -> None:
    """Rewrite `path` (scalars.jsonl) without the rows at `first_step` or later, atomically (a kill
    during the rewrite leaves the old file). A torn last line of a killed writer is dropped too."""
    kept = []
    with open(path) as f:
        for line in f:
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if record.get("step", first_step) < first_step:
                kept.append(line if line.endswith("\n") else line + "\n")
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(kept))
    os.replace(tmp, path)


def read_scalars(path: str | Path) -> list[dict[str, float]]:
    """The records a `ScalarWriter` appended to `path` (its `scalars.jsonl`), in order."""
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def histories_from_scalars(
    records: list[dict[str, float]],
) -> tuple[list[dict[str, float]], list[dict[str, float]]]:
    """(train history, validation history) of a whole run from its scalars.jsonl records (every process
    that wrote them): training rows (those with an `lm loss`) and validation rows (" validation" suffixes
    dropped), each with its step as "iteration", as `loss_figure` takes them."""
    suffix = " validation"
    train, valid = [], []
    for record in records:
        fields = {k: v for k, v in record.items() if k != "step"}
        if "lm loss" in fields:
            train.append({"iteration": float(record["step"]), **fields})
        elif any(k.endswith(suffix) for k in fields):
            stripped = {k[: -len(suffix)]: v for k, v in fields.items() if k.endswith(suffix)}
            valid.append({"iteration": float(record["step"]), **stripped})
    return train, valid


def lambda_switches(train_history: list[dict[str, float]]) -> list[tuple[float, float, float]]:
    """(iteration, λ before, λ from then on) wherever `mtp lambda` changes between logged iterations."""
    switches = []
    previous = None
    for h in train_history:
        lam = h.get("mtp lambda")
        if lam is None:
            continue
        if previous is not None and lam != previous:
            switches.append((h["iteration"], previous, lam))
        previous = lam
    return switches


def _smooth(values: list[float], window: int) -> list[float]:
    """Trailing mean over `window` points (per-iteration losses are noisy; differences more so)."""
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


def loss_figure(
    train_history: list[dict[str, float]],
    valid_history: list[dict[str, float]],
    num_depths: int,
):
    """The loss plot as a matplotlib Figure. Panel 1: main and per-depth losses; with MTP, panel 2: each
    depth's loss minus the main loss (the curves of panel 1 lie on top of each other at this scale) and
    panel 3: each depth's acceptance (top-1 accuracy). Validation values are markers; a dashed vertical
    line (gid "lambda-switch") marks every iteration where λ changes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    num_panels = 3 if num_depths > 0 else 1
    fig, axes = plt.subplots(num_panels, 1, figsize=(7, 3.2 * num_panels), sharex=True, squeeze=False)
    axes = axes[:, 0]
    window = max(1, len(train_history) // 25)
    depths = range(1, num_depths + 1)

    def curve(ax, keys, value, *, color, label, valid_label):
        """Training values (raw, faint, and smoothed) and validation values (markers) of `value(h)`."""
        train = [(h["iteration"], value(h)) for h in train_history if all(k in h for k in keys)]
        if train:
            xs, ys = zip(*train)
            ax.plot(xs, ys, color=color, alpha=0.25, linewidth=0.8)
            ax.plot(xs, _smooth(list(ys), window), color=color, label=label)
        valid = [(h["iteration"], value(h)) for h in valid_history if all(k in h for k in keys)]
        if valid:
            ax.plot(*zip(*valid), "o", color=color, label=valid_label)

    for i, name in enumerate(["lm loss"] + [f"mtp_{k} loss" for k in depths]):
        value = lambda h, n=name: h[n]
        curve(axes[0], (name,), value, color=f"C{i}", label=name, valid_label=f"{name} (validation)")
    axes[0].set_ylabel("cross-entropy (nats)")
    axes[0].set_title("main and per-depth MTP losses")
    if num_depths > 0:
        for k in depths:
            diff = lambda h, k=k: h[f"mtp_{k} loss"] - h["lm loss"]
            keys = (f"mtp_{k} loss", "lm loss")
            curve(
                axes[1],
                keys,
                diff,
                color=f"C{k}",
                label=f"mtp_{k} loss - lm loss",
                valid_label=f"mtp_{k} (validation)",
            )
            name = f"mtp_{k} acceptance"
            value = lambda h, n=name: h[n]
            curve(axes[2], (name,), value, color=f"C{k}", label=name, valid_label=f"mtp_{k} (validation)")
        axes[1].axhline(0.0, color="0.5", linewidth=0.8)
        axes[1].set_ylabel("mtp_k loss - lm loss (nats)")
        axes[2].set_ylabel("top-1 acceptance")
    for iteration, before, after in lambda_switches(train_history):
        for ax in axes:
            ax.axvline(iteration, color="k", linestyle="--", linewidth=1, gid="lambda-switch")
        axes[0].annotate(
            f"λ {before:g} → {after:g}",
            (iteration, 1.0),
            xycoords=("data", "axes fraction"),
            xytext=(3, -12),
            textcoords="offset points",
            fontsize=8,
        )
    for ax in axes:
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    axes[-1].set_xlabel("iteration")
    fig.tight_layout()
    return fig


def plot_loss_curves(
    train_history: list[dict[str, float]],
    valid_history: list[dict[str, float]],
    num_depths: int,
    path: str | Path,
) -> Path:
    """`loss_figure` as a PNG at `path`."""
    fig = loss_figure(train_history, valid_history, num_depths)
    import matplotlib.pyplot as plt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
