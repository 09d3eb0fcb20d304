"""What the trained depths buy at inference, and refreshing them after fine-tuning (issue 23), on one GPU.

    python benchmarks/speculate_workflow.py --demo DIR --code DIR --demo-prompts FILE --code-prompts FILE \
        --workdir DIR --out results.json [--iters 200,60,60]

Phases, each a real process of the app or the decoder:
  pretrain  `experiment=small_h100` (D = 2, joint) on the demo corpus for ITERS[0] iterations
  decode    `python -m mtp_plugin.speculate` on held-out demo text (the valid split's windows)
  finetune  from those weights, ITERS[1] iterations on other text (Python source) with λ = 0: the depths are
            scored but not trained and kept out of the optimizer, as an SFT/RL run without the MTP loss
  decode    on held-out code: the depths' acceptance after the trunk moved
  refresh   from the fine-tuned weights, ITERS[2] iterations of `mtp.trunk_gradients=frozen` on the code
  decode    on held-out code again
and prints the table: acceptance per draft position, mean accepted length, speculative/plain tokens/s at
batch 1 and 8, identical tokens, and ms per iteration of the joint, λ = 0 and frozen steps (same shapes).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _train(name: str, work: Path, iters: int, *overrides: str) -> dict:
    from mtp_plugin.train import logs

    ckpt = work / f"ckpt_{name}"
    args = [
        "experiment=small_h100",
        f"training.train_iters={iters}",
        "training.global_batch_size=8",
        "training.micro_batch_size=4",
        f"training.lr_warmup_iters={max(1, iters // 10)}",
        # One validation at the end, on the split the decoder's prompts come from: the teacher-forced chain
        # length there is comparable with the decoder's mean accepted length.
        f"training.eval_interval={iters}",
        "training.eval_iters=2",
        f"training.save_interval={iters}",
        f"training.save_dir={ckpt}",
        f"training.load_dir={ckpt}",
        "training.log_interval=10",
        "training.progress_bar=off",
        f"hydra.run.dir={work / ('run_' + name)}",
        *overrides,
    ]
    start = time.time()
    proc = subprocess.run(
        [sys.executable, "-m", "mtp_plugin.train", *args], cwd=REPO, capture_output=True, text=True
    )
    print(proc.stdout[-1500:], proc.stderr[-3000:] if proc.returncode else "", flush=True)
    if proc.returncode:
        raise SystemExit(f"{name} failed ({proc.returncode})")
    parsed = [logs.parse_log_line(line) for line in proc.stdout.splitlines()]
    lines = [line for line in parsed if line and "elapsed time per iteration (ms)" in line]
    validation = [line for line in parsed if line and line.get("validation")]
    # The first interval holds the start-up (allocation, first kernels): the step time is the later ones'.
    steady = lines[1:] or lines
    return {
        "checkpoint": str(ckpt),
        "iterations": iters,
        "seconds": time.time() - start,
        "ms_per_iter": sum(line["elapsed time per iteration (ms)"] for line in steady) / len(steady),
        "last_log": lines[-1],
        "validation": validation[-1] if validation else None,
    }


def _decode(checkpoint: str, prompts: str, out: Path, draft_tokens: int, new_tokens: int) -> dict:
    cmd = [sys.executable, "-m", "mtp_plugin.speculate", "--checkpoint", checkpoint, "--prompts", prompts]
    cmd += ["--draft-tokens", str(draft_tokens), "--max-new-tokens", str(new_tokens), "--json", str(out)]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    print(proc.stdout, proc.stderr[-3000:] if proc.returncode else "", flush=True)
    if proc.returncode:
        raise SystemExit(f"decode {checkpoint} failed ({proc.returncode})")
    return json.loads(out.read_text())


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--demo", required=True)
    p.add_argument("--code", required=True)
    p.add_argument("--demo-prompts", required=True)
    p.add_argument("--code-prompts", required=True)
    p.add_argument("--workdir", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--iters", default="200,60,60")
    p.add_argument("--draft-tokens", type=int, default=2)
    p.add_argument("--new-tokens", type=int, default=32)
    args = p.parse_args()
    pre_iters, ft_iters, refresh_iters = (int(x) for x in args.iters.split(","))
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    demo = [
        f"data.train_prefix={args.demo}/train_text_document",
        f"data.valid_prefix={args.demo}/valid_text_document",
    ]
    code = [
        f"data.train_prefix={args.code}/train_text_document",
        f"data.valid_prefix={args.code}/valid_text_document",
    ]
    # The fine-tune and the refresh keep the preset's depth loss path; only λ and what trains change.
    d2 = ["mtp=d2", "mtp.loss_chunk_tokens=8192"]
    out: dict = {"draft_tokens": args.draft_tokens, "new_tokens": args.new_tokens}
    decode = lambda ckpt, prompts, name: _decode(
        ckpt, prompts, work / f"{name}.json", args.draft_tokens, args.new_tokens
    )

    out["pretrain"] = _train("pretrain", work, pre_iters, *demo)
    out["decode_demo"] = decode(out["pretrain"]["checkpoint"], args.demo_prompts, "decode_demo")
    out["finetune"] = _train(
        "finetune", work, ft_iters, *code, *d2, "mtp.lambda_schedule.value=0",
        f"training.pretrained_checkpoint={out['pretrain']['checkpoint']}", "training.lr=1e-4",
    )  # fmt: skip
    shutil.rmtree(out["pretrain"]["checkpoint"])  # disk: a small checkpoint with Adam states is ~15 GB
    out["decode_code_before"] = decode(out["finetune"]["checkpoint"], args.code_prompts, "decode_code_before")
    out["refresh"] = _train(
        "refresh", work, refresh_iters, *code, *d2, "mtp.trunk_gradients=frozen",
        f"training.pretrained_checkpoint={out['finetune']['checkpoint']}",
    )  # fmt: skip
    shutil.rmtree(out["finetune"]["checkpoint"])
    out["decode_code_after"] = decode(out["refresh"]["checkpoint"], args.code_prompts, "decode_code_after")
    shutil.rmtree(out["refresh"]["checkpoint"])

    print("\nphase | ms/iter | lm loss | mtp_1 acc | mtp_2 acc | chain len (last log; validation)")
    for name in ("pretrain", "finetune", "refresh"):
        log, val = out[name]["last_log"], out[name]["validation"] or {}
        print(
            f"{name} | {out[name]['ms_per_iter']:.0f} | {log['lm loss']:.3f} | {log['mtp_1 acceptance']:.3f} | "
            f"{log['mtp_2 acceptance']:.3f} | {log['mtp chain accept length']:.3f}; "
            f"valid {val.get('mtp chain accept length', float('nan')):.3f} "
            f"(acc {val.get('mtp_1 acceptance', float('nan')):.3f} {val.get('mtp_2 acceptance', float('nan')):.3f})"
        )
    print(
        "\ndecode | batch | acceptance per position | mean accepted | plain tok/s | spec tok/s | ratio | identical"
    )
    for name in ("decode_demo", "decode_code_before", "decode_code_after"):
        for r in out[name]["results"]:
            acc = " ".join(f"{a:.3f}" for a in r["acceptance_per_position"])
            print(
                f"{name} | {r['batch_size']} | {acc} | {r['mean_accepted_length']:.3f} | {r['plain_tokens_per_s']:.1f} | "
                f"{r['speculative_tokens_per_s']:.1f} | {r['speedup']:.2f}x | {r['tokens_identical']}/{r['tokens_total']}"
            )
    Path(args.out).write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
