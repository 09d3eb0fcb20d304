"""Per-interval log lines in Megatron-LM's layout, their parser, TensorBoard scalars and the loss plot.

A training line (Megatron-LM `training_log`, with tokens instead of samples and the MTP fields):

     [2025-01-01 12:00:00] iteration       10/     100 | consumed tokens:        10240 | elapsed time per
     iteration (ms): 812.3 | tokens per second: 1260.6 | learning rate: 9.000000E-04 | global batch size:
     8 | lm loss: 7.123456E+00 | mtp_1 loss: 7.5E+00 | mtp_1 acceptance: 1.2E-02 | mtp lambda: 3.000000E-01
     | grad norm: 1.234 | peak memory (GiB): 23.45 |

(one line; the peak memory, torch.cuda.max_memory_allocated so far, on GPU only). A validation line:
` validation loss at iteration 10 | lm loss value: ... | lm loss PPL: ... | mtp_1 loss value: ... |
mtp_1 acceptance value: ... |`. Values are averaged over the log interval,
token-weighted, across data-parallel ranks.
"""

from __future__ import annotations

import json
import math
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


class ScalarWriter:
    """TensorBoard scalars (one tag per logged field) and the same values, exact, as JSON lines in
    `log_dir/scalars.jsonl` (TensorBoard keeps float32; scripts and tests compare runs bit for bit from the
    JSON: `{"step": 3, "lm loss": 6.21..., ...}`, one line per `add`, appended across resumes).
    Nothing is written when no directory is given."""

    JSONL_NAME = "scalars.jsonl"

    def __init__(self, log_dir: str | None) -> None:
        self._writer = None
        self._jsonl = None
        if log_dir:
            from torch.utils.tensorboard import SummaryWriter

            self._writer = SummaryWriter(log_dir=log_dir)
            Path(log_dir).mkdir(parents=True, exist_ok=True)
            self._jsonl = open(Path(log_dir) / self.JSONL_NAME, "a")  # noqa: SIM115 - closed in close()

    def add(self, values: Mapping[str, float], step: int, *, suffix: str = "") -> None:
        if self._writer is None:
            return
        for name, value in values.items():
            self._writer.add_scalar(name + suffix, value, step)
        record = {"step": step, **{name + suffix: float(value) for name, value in values.items()}}
        self._jsonl.write(json.dumps(record) + "\n")

    def close(self) -> None:
        if self._writer is not None:
            self._writer.flush()
            self._writer.close()
            self._jsonl.close()


def read_scalars(path: str | Path) -> list[dict[str, float]]:
    """The records a `ScalarWriter` appended to `path` (its `scalars.jsonl`), in order."""
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def plot_loss_curves(
    train_history: list[dict[str, float]],
    valid_history: list[dict[str, float]],
    num_depths: int,
    path: str | Path,
) -> Path:
    """PNG of the main and per-depth losses against iteration (training lines; validation as markers)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    names = ["lm loss"] + [f"mtp_{k} loss" for k in range(1, num_depths + 1)]
    for i, name in enumerate(names):
        color = f"C{i}"
        points = [(h["iteration"], h[name]) for h in train_history if name in h]
        if points:
            ax.plot(*zip(*points), color=color, label=name)
        vpoints = [(h["iteration"], h[name]) for h in valid_history if name in h]
        if vpoints:
            ax.plot(*zip(*vpoints), "o", color=color, label=f"{name} (validation)")
    ax.set_xlabel("iteration")
    ax.set_ylabel("cross-entropy (nats)")
    ax.set_title("main and per-depth MTP losses")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
