"""python -m mtp_plugin.speculate --checkpoint DIR --prompts FILE --draft-tokens K [--max-new-tokens N]

Decodes every prompt with plain greedy decoding and with speculative decoding (the model's own MTP
depths drafting K tokens, one trunk forward verifying them), both KV-cached in the same engine, at each
batch size; prints per draft position the acceptance rate, the mean accepted length, tokens/s of both and
whether the outputs agree token for token; `--json OUT` writes the same numbers.

Prompts: a text file, one prompt per line, tokenized with GPT-2's BPE (the app's tokenizer), or a
`.jsonl` file of {"token_ids": [...]} lines (already tokenized, e.g. windows of a held-out split). The
rows of a batch decode in lockstep from one prompt length: a batch's prompts are cut to its shortest
(keeping their last tokens). Bad input is one `error:` line and exit status 2, before the model is built.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

# Drafts beyond the D trained depths chain depth D on itself; past this, acceptance has decayed to noise.
MAX_DRAFT_TOKENS = 16


class BadInput(ValueError):
    pass


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m mtp_plugin.speculate", description=__doc__.split("\n\n")[1])
    p.add_argument(
        "--checkpoint", required=True, help="a save_dir of the app (its `latest`) or one iter_* dir"
    )
    p.add_argument("--prompts", required=True, help="text file (one prompt per line) or .jsonl of token_ids")
    p.add_argument("--draft-tokens", type=int, required=True, help=f"K, 1..{MAX_DRAFT_TOKENS}")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--batch-sizes", default="1,8", help="comma-separated (default 1,8)")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default=None, help="default: bf16 on CUDA")
    p.add_argument("--json", default=None, help="write the results here")
    return p


def _read_prompts(path: Path, vocab_size: int) -> list[list[int]]:
    if not path.is_file():
        raise BadInput(f"--prompts {path} does not exist")
    if path.suffix == ".jsonl":
        prompts = []
        for number, line in enumerate(path.read_text().splitlines(), start=1):
            if line.strip():
                try:
                    prompts.append([int(t) for t in json.loads(line)["token_ids"]])
                except (ValueError, KeyError, TypeError) as err:
                    raise BadInput(
                        f'--prompts {path}:{number}: not a {{"token_ids": [...]}} line ({err})'
                    ) from None
    else:
        from mtp_plugin.data import load_gpt2_tokenizer

        tokenizer = load_gpt2_tokenizer()
        prompts = [tokenizer.encode(line) for line in path.read_text().splitlines() if line.strip()]
    prompts = [p for p in prompts if p]
    if not prompts:
        raise BadInput(f"--prompts {path} holds no prompt")
    for number, ids in enumerate(prompts, start=1):
        bad = [t for t in ids if not 0 <= t < vocab_size]
        if bad:
            raise BadInput(
                f"prompt {number} holds token id {bad[0]}, outside the model's vocabulary [0, {vocab_size}); "
                "tokenize with the model's tokenizer"
            )
    return prompts


def _check(args, info) -> None:
    k = args.draft_tokens
    if not info.mtp.num_depths:
        raise BadInput(
            f"{info.path} has no MTP depths (mtp.num_depths=0): plain greedy decoding is the only mode for it; "
            "speculative decoding needs a model trained with depths"
        )
    if k < 1:
        raise BadInput(
            f"--draft-tokens {k}: draft at least 1 token (the model has {info.mtp.num_depths} depths)"
        )
    if k > MAX_DRAFT_TOKENS:
        raise BadInput(
            f"--draft-tokens {k} is more than this engine drafts ({MAX_DRAFT_TOKENS}; beyond the "
            f"{info.mtp.num_depths} trained depths it chains the last one); use at most {MAX_DRAFT_TOKENS}"
        )
    if args.max_new_tokens < 1:
        raise BadInput(f"--max-new-tokens {args.max_new_tokens}: generate at least 1 token")


def _batch_sizes(text: str) -> list[int]:
    try:
        sizes = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise BadInput(f"--batch-sizes {text!r}: give sizes like 1,8") from None
    if not sizes or min(sizes) < 1:
        raise BadInput(f"--batch-sizes {text!r}: give sizes >= 1, like 1,8")
    return sizes


def _check_lengths(prompts: list[list[int]], max_new: int, positions: int) -> None:
    for number, ids in enumerate(prompts, start=1):
        if len(ids) + max_new > positions:
            raise BadInput(
                f"prompt {number} has {len(ids)} tokens; with --max-new-tokens {max_new} that is "
                f"{len(ids) + max_new} positions, more than the model's {positions}; shorten it or "
                "generate fewer tokens"
            )


def decode_all(decoder, prompts: list[list[int]], *, batch_size: int, max_new_tokens: int, draft_tokens: int):
    """Plain and speculative decoding of every prompt in batches; returns the summary dict of one batch size."""
    from mtp_plugin.speculate.decoder import DecodeStats

    device = decoder.device
    plain_total, spec_total = (
        DecodeStats(0),
        DecodeStats(draft_tokens, [0] * draft_tokens, [0] * draft_tokens),
    )
    agree_prompts = agree_tokens = total_tokens = 0
    for start in range(0, len(prompts), batch_size):
        group = prompts[start : start + batch_size]
        length = min(len(p) for p in group)
        prompt_bs = torch.tensor([p[len(p) - length :] for p in group], device=device)
        plain_bn, plain = decoder.greedy(prompt_bs, max_new_tokens)
        spec_bn, spec = decoder.speculative(prompt_bs, max_new_tokens, draft_tokens)
        same_bn = plain_bn == spec_bn
        agree_prompts += int(same_bn.all(dim=1).sum())
        agree_tokens += int(same_bn.sum())
        total_tokens += same_bn.numel()
        plain_total.new_tokens += plain.new_tokens
        plain_total.seconds += plain.seconds
        for name in ("rounds", "row_rounds", "row_accepted", "new_tokens", "seconds"):
            setattr(spec_total, name, getattr(spec_total, name) + getattr(spec, name))
        spec_total.proposed = [a + b for a, b in zip(spec_total.proposed, spec.proposed)]
        spec_total.accepted = [a + b for a, b in zip(spec_total.accepted, spec.accepted)]
        spec_total.committed_per_round += spec.committed_per_round
    return {
        "batch_size": batch_size,
        "prompts": len(prompts),
        "draft_tokens": draft_tokens,
        "acceptance_per_position": spec_total.acceptance_per_position,
        "mean_accepted_length": spec_total.mean_accepted_length,
        "tokens_per_round": sum(spec_total.committed_per_round) / max(len(spec_total.committed_per_round), 1),
        "plain_tokens_per_s": plain_total.tokens_per_second,
        "speculative_tokens_per_s": spec_total.tokens_per_second,
        "speedup": spec_total.tokens_per_second / max(plain_total.tokens_per_second, 1e-9),
        "prompts_identical": agree_prompts,
        "tokens_identical": agree_tokens,
        "tokens_total": total_tokens,
    }


def format_row(r: dict) -> str:
    acceptance = " ".join(f"{a:.3f}" for a in r["acceptance_per_position"])
    return (
        f"{r['batch_size']:>5} | {r['plain_tokens_per_s']:>10.1f} | {r['speculative_tokens_per_s']:>10.1f} | "
        f"{r['speedup']:>5.2f}x | {r['mean_accepted_length']:>8.3f} | {r['tokens_per_round']:>7.3f} | "
        f"{r['tokens_identical']}/{r['tokens_total']} ({r['prompts_identical']}/{r['prompts']} prompts) | "
        f"{acceptance}"
    )


HEADER = (
    "batch | plain tok/s | spec tok/s | ratio | accepted | tok/step | identical to plain greedy | "
    "acceptance by draft position"
)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    from mtp_plugin.speculate.load import close, load_model, read_checkpoint_info

    try:
        try:
            info = read_checkpoint_info(args.checkpoint)
        except (FileNotFoundError, ValueError, KeyError, TypeError) as err:
            raise BadInput(f"--checkpoint {args.checkpoint}: {err}") from None
        _check(args, info)
        sizes = _batch_sizes(args.batch_sizes)
        prompts = _read_prompts(Path(args.prompts), info.model.vocab_size)
        _check_lengths(prompts, args.max_new_tokens, info.model.seq_length)
    except BadInput as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    cuda = torch.cuda.is_available()
    dtype = getattr(torch, args.dtype or ("bfloat16" if cuda else "float32"))
    device = torch.device("cuda" if cuda else "cpu")
    model = load_model(info, dtype=dtype, device=device)
    from mtp_plugin.speculate.decoder import SpeculativeDecoder

    decoder = SpeculativeDecoder(model)
    # One short warm-up of each mode (allocations, kernel selection) before anything is timed.
    warm = torch.tensor([prompts[0]], device=device)
    decoder.greedy(warm, 2)
    decoder.speculative(warm, 2, args.draft_tokens)
    print(
        f"{info.path}: D = {info.mtp.num_depths} depths, K = {args.draft_tokens} draft tokens, "
        f"{len(prompts)} prompts, {args.max_new_tokens} new tokens each, {dtype}, {device}"
    )
    print(HEADER)
    results = []
    for size in sizes:
        row = decode_all(
            decoder,
            prompts,
            batch_size=size,
            max_new_tokens=args.max_new_tokens,
            draft_tokens=args.draft_tokens,
        )
        results.append(row)
        print(format_row(row), flush=True)
    close()
    if args.json:
        meta = {"checkpoint": str(info.path), "num_depths": info.mtp.num_depths, "dtype": str(dtype)}
        meta["device"] = torch.cuda.get_device_name() if cuda else "cpu"
        Path(args.json).write_text(json.dumps({**meta, "results": results}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
