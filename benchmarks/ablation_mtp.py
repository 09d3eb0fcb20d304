"""What MTP buys: NTP vs MTP D=1 vs MTP D=2 from one initialisation, at equal tokens and at equal FLOPs.

Arms (each in its own process: Megatron keeps process-global state), trained with the project's own
Trainer on a composed Hydra configuration (`--model`, default `small`, demo corpus):

- `ntp`: MTP off (mtp=off);
- `mtp-d1`, `mtp-d2`: DeepSeek-V3's λ schedule scaled to the run (λ = 0.3, then 0.1 from 2/3 of the
  arm's tokens; mtp=deepseek_v3 with num_depths 1 or 2), the same iterations as `ntp` (equal tokens);
- `mtp-d1-flops`, `mtp-d2-flops`: fewer iterations, so that their training FLOPs (as the ρ meter counts
  them in the equal-token arms) match `ntp`'s (equal FLOPs).

Every arm starts from the weights `ntp` starts from: `ntp` writes its initial state, the MTP arms load
it into the shared modules (embedding, trunk, head) and re-sync the optimizer's fp32 master weights; only
the MTP depths are initialised on their own. At the end each arm is evaluated on `--valid-prefix` (any
indexed dataset; the first `eval_iters x global_batch` sequences): the main head's loss and bits per
byte, each depth's loss and top-1 acceptance. Recorded per arm: iterations, tokens, training FLOPs and
ρ_effective (bits/GFLOP, from the ρ meter), wall time.

    python benchmarks/ablation_mtp.py --out ablation.json --table ablation.md \
        --valid-prefix data_cache/demo/valid_text_document

Bits per byte = (main loss in nats / ln 2) x (tokens / UTF-8 bytes) of the validation split, the ratio
taken over the whole split decoded with the GPT-2 tokenizer (`--tokenizer-dir`, default: the package).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
for path in (REPO, REPO / "benchmarks"):  # the package from a checkout, and bench_mtp beside this file
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

EQUAL_TOKEN_ARMS = ("ntp", "mtp-d1", "mtp-d2")
EQUAL_FLOP_ARMS = ("mtp-d1-flops", "mtp-d2-flops")


def arm_depth(arm: str) -> int:
    return 0 if arm == "ntp" else int(arm.split("-d")[1][0])


def overrides_for(arm: str, iters: int, args) -> list[str]:
    """Hydra overrides of one arm (the same shape, data, optimiser and evaluation for every arm)."""
    depth = arm_depth(arm)
    tokens = iters * args.global_batch * args.seq
    out = [
        f"model={args.model}",
        "parallel=single",
        "backend=megatron",
        "data=demo",
        f"data.train_prefix={args.train_prefix}",
        f"data.valid_prefix={args.valid_prefix}",
        f"model.seq_length={args.seq}",
        f"training.train_iters={iters}",
        f"training.global_batch_size={args.global_batch}",
        f"training.micro_batch_size={args.micro_batch}",
        f"training.lr={args.lr}",
        f"training.min_lr={args.lr / 10}",
        f"training.lr_warmup_iters={iters // 10}",
        f"training.clip_grad={args.clip_grad}",
        f"training.eval_interval={iters}",
        f"training.eval_iters={args.eval_iters}",
        f"training.log_interval={args.log_interval}",
        "training.save_interval=0",
        "training.save_dir=null",
        "training.load_dir=null",
        "training.tensorboard_dir=null",
        "training.progress_bar=off",
        f"training.seed={args.seed}",
        f"backend.params_dtype={args.dtype}",
    ]
    if depth == 0:
        out.append("mtp=off")
    else:
        out += [
            "mtp=deepseek_v3",
            f"mtp.num_depths={depth}",
            f"mtp.lambda_schedule.boundaries_tokens=[{round(tokens * 2 / 3)}]",
        ]
    return out


# ----------------------------------------------------------------------------------- one arm


def run_arm(arm: str, iters: int, args) -> dict:
    """Train and evaluate one arm in this process; returns its record."""
    import torch
    from hydra import compose, initialize_config_dir

    from mtp_plugin.train.hydra_app import (
        CONFIG_DIR,
        CONFIG_NAME,
        launch_experiment,
        quiet_megatron,
        register_configs,
    )

    quiet_megatron()
    register_configs()
    run_dir = args.work_dir / arm
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3", job_name="ablation"):
        cfg = compose(config_name=CONFIG_NAME, overrides=overrides_for(arm, iters, args))
    experiment, _ = launch_experiment(cfg, run_dir)
    if not torch.cuda.is_available():
        from mtp_plugin.train.cpu import enable_megatron_on_cpu

        enable_megatron_on_cpu()
    from mtp_plugin.train.loop import Trainer, init_distributed

    init_distributed()
    trainer = Trainer(experiment, print_fn=lambda line: print(f"[{arm}] {line}", flush=True))
    trainer.setup()
    init_path = args.work_dir / "init_state.pt"
    if arm == "ntp":
        state = trainer.model.state_dict()
        torch.save({k: v.detach().cpu() for k, v in state.items() if torch.is_tensor(v)}, init_path)
    else:
        _load_shared_init(trainer, torch.load(init_path, weights_only=True))
    t0 = time.perf_counter()
    result = trainer.train()
    wall_s = time.perf_counter() - t0
    trainer.close()
    torch.distributed.destroy_process_group()
    valid = dict(result.valid_history[-1]) if result.valid_history else {}
    flops = sum(r.get("flops", 0.0) for r in result.rho_history)
    bits = sum(r.get("bits effective", 0.0) for r in result.rho_history)
    depth = arm_depth(arm)
    return {
        "arm": arm,
        "depths": depth,
        "iterations": result.iterations,
        "tokens": result.consumed_tokens,
        "train_flops": flops,
        "rho_effective_bits_per_gflop": bits * 1e9 / flops if flops else None,
        "wall_s": wall_s,
        "peak_memory_gib": result.peak_memory_gib,
        "train_loss_last": result.train_history[-1].get("lm loss") if result.train_history else None,
        "valid": valid,
        "valid_main_loss": valid.get("lm loss"),
        "valid_depth_loss": [valid.get(f"mtp_{k} loss") for k in range(1, depth + 1)],
        "valid_depth_acceptance": [valid.get(f"mtp_{k} acceptance") for k in range(1, depth + 1)],
    }


def _load_shared_init(trainer, state: dict) -> None:
    """Copy `ntp`'s initial weights into every module this model shares with it; re-sync Adam's masters."""
    import torch

    own = trainer.model.state_dict()
    shared = [k for k in state if k in own and own[k].shape == state[k].shape]
    missing = [k for k in state if k not in own and not k.endswith("_extra_state")]
    if missing:
        raise RuntimeError(
            f"the MTP model lacks {len(missing)} of the NTP model's tensors, e.g. {missing[0]}"
        )
    with torch.no_grad():
        for k in shared:
            if torch.is_tensor(own[k]) and own[k].is_floating_point():
                own[k].copy_(state[k])
    trainer.optimizer.reload_model_params()  # the fp32 main params follow the copied bf16 weights


# ----------------------------------------------------------------------------------- driver


def valid_bytes_per_token(prefix: str, tokenizer_dir: str | None) -> tuple[int, int]:
    """(tokens, UTF-8 bytes) of the whole indexed dataset at `prefix`, decoded with GPT-2's BPE."""
    from mtp_plugin.data.indexed import read_indexed_dataset
    from mtp_plugin.data.tokenizer import GPT2Tokenizer, verified_gpt2_files

    files = verified_gpt2_files(tokenizer_dir)
    tok = GPT2Tokenizer(files["encoder.json"], files["vocab.bpe"])
    num_tokens = num_bytes = 0
    for document in read_indexed_dataset(prefix):
        ids = document.tolist()
        num_tokens += len(ids)
        num_bytes += len(tok.decode([t for t in ids if t != tok.eod_id]).encode("utf-8"))
    return num_tokens, num_bytes


def _run_isolated(arm: str, iters: int, args, argv: list[str]) -> dict:
    from bench_mtp import run_child

    cmd = [sys.executable, str(Path(__file__).resolve()), *argv, "--only", arm, "--only-iters", str(iters)]
    t0 = time.monotonic()
    record, failure = run_child(cmd, args.arm_timeout)
    if record is None:
        return {"arm": arm, **failure}
    record["process_s"] = time.monotonic() - t0
    return record


def format_tables(records: list[dict], bytes_per_token: float | None) -> str:
    def fmt(x, f="{:.4f}"):
        return "n/a" if x is None else f.format(x)

    head = (
        "| arm | iters | tokens | train TFLOP | wall s | ρ_eff bits/GFLOP | valid main loss | bits/byte "
        "| depth losses | depth acceptance |\n|---|---|---|---|---|---|---|---|---|---|"
    )
    out = []
    for title, arms in (("Equal tokens", EQUAL_TOKEN_ARMS), ("Equal FLOPs", ("ntp", *EQUAL_FLOP_ARMS))):
        rows = [head]
        for arm in arms:
            r = next((x for x in records if x["arm"] == arm), None)
            if r is None:
                continue
            if "error" in r:
                rows.append(f"| {arm} | {r['error']} | | | | | | | | |")
                continue
            loss = r["valid_main_loss"]
            bpb = loss / math.log(2) / bytes_per_token if (loss is not None and bytes_per_token) else None
            r["valid_bits_per_byte"] = bpb
            rows.append(
                f"| {arm} | {r['iterations']} | {r['tokens']:,} | {r['train_flops'] / 1e12:.1f} | {r['wall_s']:.0f} "
                f"| {fmt(r['rho_effective_bits_per_gflop'])} | {fmt(loss)} | {fmt(bpb)} "
                f"| {', '.join(fmt(x) for x in r['valid_depth_loss']) or '-'} "
                f"| {', '.join(fmt(x, '{:.3f}') for x in r['valid_depth_acceptance']) or '-'} |"
            )
        out.append(f"{title}:\n\n" + "\n".join(rows))
    return "\n\n".join(out)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=Path("ablation_mtp.json"))
    p.add_argument("--table", type=Path, default=None, help="also write the Markdown tables here")
    p.add_argument("--model", default="small", help="a model/ group option of hydra_configs")
    p.add_argument("--train-prefix", default="data_cache/demo/train_text_document")
    p.add_argument("--valid-prefix", default="data_cache/demo/valid_text_document")
    p.add_argument("--tokenizer-dir", default=None, help="encoder.json + vocab.bpe (default: the package)")
    p.add_argument("--iters", type=int, default=100, help="iterations of the equal-token arms")
    p.add_argument("--global-batch", type=int, default=8)
    p.add_argument("--micro-batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--clip-grad", type=float, default=1.0)
    p.add_argument("--eval-iters", type=int, default=4)
    p.add_argument("--log-interval", type=int, default=10)
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--arms", default=",".join(EQUAL_TOKEN_ARMS + EQUAL_FLOP_ARMS))
    p.add_argument("--arm-timeout", type=float, default=480.0, help="seconds per arm (issue 14: <= 8 min)")
    p.add_argument("--budget-s", type=float, default=1e9, help="skip arms started after this many seconds")
    p.add_argument("--work-dir", type=Path, default=Path("/tmp/ablation_mtp"))
    p.add_argument("--only", default=None, help=argparse.SUPPRESS)
    p.add_argument("--only-iters", type=int, default=None, help=argparse.SUPPRESS)
    return p


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    args.work_dir.mkdir(parents=True, exist_ok=True)
    if args.only:
        try:
            record = run_arm(args.only, args.only_iters, args)
        except SystemExit as err:  # the project's one-line configuration errors (ConfigError)
            print(" ".join(str(a) for a in err.args[1:]) or repr(err), file=sys.stderr, flush=True)
            raise
        print("RESULT " + json.dumps(record), flush=True)
        return 0
    arms = [a for a in args.arms.split(",") if a]
    if arms and arms[0] != "ntp" and not (args.work_dir / "init_state.pt").exists():
        raise SystemExit("--arms must start with ntp: it writes the initial weights the MTP arms start from")
    tokens, num_bytes = valid_bytes_per_token(args.valid_prefix, args.tokenizer_dir)
    bytes_per_token = num_bytes / tokens
    print(
        f"valid split: {tokens:,} tokens, {num_bytes:,} bytes ({bytes_per_token:.3f} bytes/token)", flush=True
    )
    start, records = time.monotonic(), []
    flops_per_iter = {}
    for arm in arms:
        if time.monotonic() - start > args.budget_s:
            records.append({"arm": arm, "error": "skipped (time budget)"})
            continue
        iters = args.iters
        if arm in EQUAL_FLOP_ARMS:
            twin = arm.removesuffix("-flops")
            if "ntp" not in flops_per_iter or twin not in flops_per_iter:
                records.append(
                    {"arm": arm, "error": f"needs ntp and {twin} first (their FLOPs per iteration)"}
                )
                continue
            iters = max(1, round(args.iters * flops_per_iter["ntp"] / flops_per_iter[twin]))
        r = _run_isolated(arm, iters, args, argv)
        records.append(r)
        if "error" not in r and r["iterations"]:
            flops_per_iter[arm] = r["train_flops"] / r["iterations"]
        brief = r.get("error") or (
            f"{r['iterations']} iters, {r['wall_s']:.0f} s, valid loss {r['valid_main_loss']}, "
            f"depths {r['valid_depth_loss']}, acceptance {r['valid_depth_acceptance']}"
        )
        print(f"[{time.monotonic() - start:6.0f} s] {arm}: {brief}", flush=True)
        _write(args, records, bytes_per_token, tokens, num_bytes)
    print("\n" + _write(args, records, bytes_per_token, tokens, num_bytes))
    return 0


def _write(args, records, bytes_per_token, tokens, num_bytes) -> str:
    import torch

    tables = format_tables(records, bytes_per_token)
    env = {
        "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
        "torch": torch.__version__,
    }
    record = {
        "env": env,
        "args": {k: str(v) for k, v in vars(args).items()},
        "valid": {
            "prefix": args.valid_prefix,
            "tokens": tokens,
            "bytes": num_bytes,
            "bytes_per_token": bytes_per_token,
        },
        "arms": records,
    }
    args.out.write_text(json.dumps(record, indent=1, default=str))
    if args.table:
        args.table.write_text(f"{env}\n\n{tables}\n")
    return tables


if __name__ == "__main__":
    sys.exit(main())
