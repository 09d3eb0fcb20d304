"""`python -m mtp_plugin.convert` (issue 27): a checkpoint of experiment=deepseek_v3_tiny_demo (MLA, sigmoid
routing with the balancing bias, shared expert, dense first layer, D = 2), trained by the app for a few
iterations on the tiny corpus, goes out as a Hugging Face DeepSeek-V3 checkpoint with its MTP layers and
comes back in.

- transformers' `DeepseekV3ForCausalLM` loads the export with no missing key; its logits are the plugin's
  main logits (fp32, max |diff| / max |logit| <= 1e-4);
- a reference MTP forward written here from the exported tensors alone (DeepSeek-V3's equations; the
  depth's block is transformers' DeepseekV3DecoderLayer holding that layer's tensors) gives the plugin's
  depth logits under the Megatron / SGLang convention (depth k+1 reads the normed state the shared head
  reads) and not, at depth 2, under vLLM's (the block output before shared_head.norm);
- export -> import -> export is bit-identical; importing into a run with a third depth initialises it and
  says so; pp2, tp2 and ep2 checkpoints of the same weights export the same tensors;
- the import, then one training step, equals that step from the original checkpoint (losses and every
  gradient);
- bad input: one line `error: ...`, exit 2, nothing written.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from distributed_utils import run_distributed
from train_tiny import EOD, REPO, VOCAB, run_app, write_tiny_corpus

pytestmark = [pytest.mark.megatron, pytest.mark.slow]

ITERS = 3


def _run_overrides(train: str, valid: str) -> list[str]:
    """The tiny MLA preset on the tiny corpus (its vocabulary and a 32-token window)."""
    return [
        "experiment=deepseek_v3_tiny_demo",
        f"model.vocab_size={VOCAB}",
        "model.seq_length=32",
        f"data.train_prefix={train}",
        f"data.valid_prefix={valid}",
        f"data.eod_id={EOD}",
        f"training.train_iters={ITERS}",
        "training.global_batch_size=4",
        "training.micro_batch_size=2",
        "training.lr_warmup_iters=1",
        # A large step, so that the trained norms differ clearly from 1 (the D >= 2 conventions differ then).
        "training.lr=2.0e-2",
        "training.eval_interval=0",
        "training.log_interval=1",
        "training.progress_bar=off",
        "training.tensorboard_dir=null",
    ]


def convert(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "mtp_plugin.convert", *args],
        cwd=REPO,
        env={
            **os.environ,
            "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
        },
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def _ok(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc.stdout


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """The app trains the preset ITERS iterations and saves; the checkpoint is exported once."""
    root = tmp_path_factory.mktemp("convert")
    train, valid = write_tiny_corpus(root / "corpus")
    overrides = _run_overrides(train, valid)
    save_dir = root / "run" / "checkpoints"
    proc = run_app(
        *overrides,
        f"training.save_interval={ITERS}",
        f"training.save_dir={save_dir}",
        f"hydra.run.dir={root / 'run'}",
        timeout=400,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    _ok(convert("export", "--checkpoint", str(save_dir), "--out", str(root / "hf")))
    return {"root": root, "overrides": overrides, "save_dir": save_dir, "hf": root / "hf"}


def _hf_tensors(directory: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    index = json.loads((directory / "model.safetensors.index.json").read_text())
    out = {}
    for file in sorted(set(index["weight_map"].values())):
        out.update(load_file(str(directory / file)))
    assert set(out) == set(index["weight_map"])
    return out


def _assert_same_export(a: Path, b: Path) -> None:
    assert json.loads((a / "config.json").read_text()) == json.loads((b / "config.json").read_text())
    ta, tb = _hf_tensors(a), _hf_tensors(b)
    assert sorted(ta) == sorted(tb)
    different = [
        name for name in ta if ta[name].dtype != tb[name].dtype or not torch.equal(ta[name], tb[name])
    ]
    assert not different, different[:5]


# ------------------------------------------------------------------------ the plugin's own logits


def _plugin_logits_worker(overrides: list[str], checkpoint: str, tokens: torch.Tensor) -> dict:
    """The run's model with the checkpoint's weights: main logits and each depth's logits (the states the
    plugin's MTPStack returns, scored by the output head), for `tokens` [b, s]."""
    from mtp_plugin.convert.megatron_io import load_weights, single_process_model
    from mtp_plugin.train.hydra_app import compose_experiment

    cfg = compose_experiment(overrides)
    with single_process_model(cfg) as model:
        load_weights(model, checkpoint)
        model.eval()
        captured = []
        model.mtp_stack.register_forward_hook(lambda module, args, output: captured.extend(output))
        positions = torch.arange(tokens.shape[1]).expand_as(tokens)
        with torch.no_grad():
            main = model(tokens, positions, None)
            head = model.output_layer.weight
            depths = [(h.transpose(0, 1) @ head.t()).clone() for h in captured]
    return {"main": main.clone(), "depths": depths}


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight


def _reference_depth_logits(hf_model, tensors: dict, tokens: torch.Tensor, *, convention: str) -> list:
    """DeepSeek-V3's MTP forward from the exported tensors of layers L .. L+D-1:

        h'_k = eh_proj([enorm(Emb_k(t_{i+k})); hnorm(g_{k-1})]),  b_k = TRM_k(h'_k),
        logits_k = shared_head.head(shared_head.norm(b_k)),
        g_0 = the trunk's state after its final norm; g_k = shared_head.norm(b_k) ("megatron": Megatron-Core
        0.19, SGLang's NextN) or g_k = b_k ("vllm": vLLM's deepseek_mtp chains the block output).

    TRM_k is transformers' DeepseekV3DecoderLayer holding layer L+k-1's exported tensors."""
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3DecoderLayer

    config = hf_model.config
    num_layers, eps = config.num_hidden_layers, config.rms_norm_eps
    b, s = tokens.shape
    positions = torch.arange(s).expand(b, s)
    causal = torch.full((s, s), float("-inf")).triu(1)[None, None]
    with torch.no_grad():
        state = hf_model.model(tokens).last_hidden_state  # after model.norm
        rotary = hf_model.model.rotary_emb(state, positions)
        out = []
        for k in range(1, config.num_nextn_predict_layers + 1):
            p = f"model.layers.{num_layers + k - 1}."
            block = DeepseekV3DecoderLayer(config, layer_idx=num_layers + k - 1).eval()
            block_state = {
                name[len(p) :]: t
                for name, t in tensors.items()
                if name.startswith(p) and ".experts." not in name and not name.startswith(p + "shared_head")
                if not name[len(p) :].startswith(("enorm", "hnorm", "eh_proj", "embed_tokens"))
            }
            experts = range(config.n_routed_experts)
            block_state["mlp.experts.gate_up_proj"] = torch.stack(
                [
                    torch.cat(
                        [
                            tensors[f"{p}mlp.experts.{e}.gate_proj.weight"],
                            tensors[f"{p}mlp.experts.{e}.up_proj.weight"],
                        ]
                    )
                    for e in experts
                ]
            )
            block_state["mlp.experts.down_proj"] = torch.stack(
                [tensors[f"{p}mlp.experts.{e}.down_proj.weight"] for e in experts]
            )
            missing, unexpected = block.load_state_dict(block_state, strict=False)
            assert not missing and not unexpected, (missing, unexpected)
            shifted = torch.cat([tokens[:, k:], tokens[:, :k]], dim=1)  # t_{i+k}; the last k positions unused
            emb = torch.nn.functional.embedding(shifted, tensors[p + "embed_tokens.weight"])
            x = torch.cat(
                [
                    _rms_norm(emb, tensors[p + "enorm.weight"], eps),
                    _rms_norm(state, tensors[p + "hnorm.weight"], eps),
                ],
                -1,
            )
            x = x @ tensors[p + "eh_proj.weight"].t()
            block_out = block(x, attention_mask=causal, position_ids=positions, position_embeddings=rotary)
            block_out = block_out[0] if isinstance(block_out, tuple) else block_out
            normed = _rms_norm(block_out, tensors[p + "shared_head.norm.weight"], eps)
            out.append(normed @ tensors[p + "shared_head.head.weight"].t())
            state = normed if convention == "megatron" else block_out
    return out


def test_transformers_loads_the_export_and_gives_the_plugins_logits(trained):
    from transformers import DeepseekV3ForCausalLM

    hf_model, info = DeepseekV3ForCausalLM.from_pretrained(
        trained["hf"], dtype=torch.float32, attn_implementation="eager", output_loading_info=True
    )
    hf_model.eval()
    assert info["missing_keys"] == [] or info["missing_keys"] == set(), info["missing_keys"]
    assert not info["mismatched_keys"]
    # What transformers does not model is exactly the MTP layers (it has no MTP forward).
    config = hf_model.config
    mtp_layers = {str(config.num_hidden_layers + k) for k in range(config.num_nextn_predict_layers)}
    assert {key.split(".")[2] for key in info["unexpected_keys"]} == mtp_layers

    tokens = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, VOCAB - 1, (2, 32), generator=tokens)
    checkpoint = trained["save_dir"] / f"iter_{ITERS:07d}"
    plugin = run_distributed(
        _plugin_logits_worker, 1, trained["overrides"], str(checkpoint), tokens, timeout=300
    )[0]
    with torch.no_grad():
        hf_logits = hf_model(tokens).logits
    assert hf_logits.shape == plugin["main"].shape == (2, 32, config.vocab_size)
    assert _rel_err(hf_logits, plugin["main"]) <= 1e-4

    tensors = _hf_tensors(trained["hf"])
    reference = {
        c: _reference_depth_logits(hf_model, tensors, tokens, convention=c) for c in ("megatron", "vllm")
    }
    # Depth k has no input token beyond position 32 - k - 1; the causal blocks keep earlier positions exact.
    errors = {
        convention: [
            _rel_err(r[:, : 32 - k], p[:, : 32 - k]) for k, (r, p) in enumerate(zip(ref, plugin["depths"]), 1)
        ]
        for convention, ref in reference.items()
    }
    print(f"max |diff| / max |logit|: main {_rel_err(hf_logits, plugin['main']):.2e}, depths {errors}")
    assert len(plugin["depths"]) == 2
    # Megatron / SGLang: every depth as the plugin trained it.
    assert max(errors["megatron"]) <= 1e-4, errors
    # vLLM: depth 1 is the same (g_0 is the trunk's normed state either way); depth 2 is another model.
    assert errors["vllm"][0] <= 1e-4, errors
    assert errors["vllm"][1] > 1e-2, errors


# --------------------------------------------------------------------------- round trips and layouts


def test_export_import_export_is_bit_identical_and_a_missing_depth_is_initialised(trained):
    root, overrides = trained["root"], trained["overrides"]
    imported = root / "imported"
    out = _ok(convert("import", str(trained["hf"]), "--out", str(imported), *overrides))
    assert f"training.load_dir={imported}" in out
    assert (imported / "latest").read_text().strip() == "iter_0000000"
    _ok(convert("export", "--checkpoint", str(imported), "--out", str(root / "hf_again")))
    _assert_same_export(trained["hf"], root / "hf_again")
    # The app starts from it (training.load_dir) at iteration 0.
    run = run_app(
        *overrides,  # the same run (its λ schedule is bound to train_iters), stopped after one iteration
        "training.exit_interval=1",
        "training.save_dir=null",
        "training.save_interval=0",
        f"training.load_dir={imported}",
        f"hydra.run.dir={root / 'from_hf'}",
    )
    assert run.returncode == 0, run.stderr[-3000:]
    assert (
        f"started from the weights in {imported / 'iter_0000000'} (fresh optimizer, iteration 0)"
        in run.stdout
    )
    assert f"iteration        1/       {ITERS}" in run.stdout

    # The run trains D = 3; the HF checkpoint has 2 MTP layers: depth 3 starts from the run's initialisation.
    three = root / "imported_d3"
    out = _ok(convert("import", str(trained["hf"]), "--out", str(three), *overrides, "mtp.num_depths=3"))
    assert (
        "holds 2 MTP layer(s) and the run trains D = 3: depth(s) 3 start from the run's initialisation" in out
    )
    _ok(convert("export", "--checkpoint", str(three), "--out", str(root / "hf_d3")))
    first, again = _hf_tensors(trained["hf"]), _hf_tensors(root / "hf_d3")
    assert json.loads((root / "hf_d3" / "config.json").read_text())["num_nextn_predict_layers"] == 3
    assert all(torch.equal(first[name], again[name]) for name in first)
    depth3 = [name for name in again if name.startswith("model.layers.5.")]
    assert depth3 and not any(
        torch.equal(again[name], first[name.replace("layers.5.", "layers.4.")])
        for name in depth3
        if "proj" in name
    )


def _layouts_worker(overrides: list[str], imported: str, root: str) -> None:
    """The app's Trainer under pp2, tp2 and ep2 (two ranks each), started from the imported weights and
    saved at once: three checkpoints of the same weights in three layouts."""
    from mtp_plugin.train.hydra_app import compose_experiment
    from mtp_plugin.train.loop import Trainer

    for name, parallel in (
        ("pp2", "parallel.pipeline_model_parallel_size=2 parallel.pipeline_layout='Ett|tmmL'"),
        ("tp2", "parallel.tensor_model_parallel_size=2"),
        ("ep2", "parallel.expert_model_parallel_size=2"),
    ):
        cfg = compose_experiment(
            [
                *overrides,
                *parallel.split(),
                f"training.load_dir={imported}",
                f"training.save_dir={root}/{name}",
            ]
        )
        trainer = Trainer(cfg, print_fn=lambda line: None)
        trainer.setup()
        trainer.save()
        trainer.close()


def test_pp2_tp2_and_ep2_checkpoints_export_the_same_tensors(trained):
    root = trained["root"]
    imported = root / "imported_for_layouts"
    _ok(convert("import", str(trained["hf"]), "--out", str(imported), *trained["overrides"]))
    run_distributed(
        _layouts_worker, 2, trained["overrides"], str(imported), str(root), parallel=None, timeout=500
    )
    for name in ("pp2", "tp2", "ep2"):
        _ok(convert("export", "--checkpoint", str(root / name), "--out", str(root / f"hf_{name}")))
        _assert_same_export(trained["hf"], root / f"hf_{name}")


def _one_step_worker(overrides: list[str], original: str, imported: str) -> dict:
    """One training step of the app's Trainer from each checkpoint, on the run's first global batch: the
    step's reduced losses and every parameter's gradient, by checkpoint."""
    from mtp_plugin.train.hydra_app import compose_experiment
    from mtp_plugin.train.loop import Trainer

    out = {}
    for name, load_dir in (("original", original), ("imported", imported)):
        trainer = Trainer(
            compose_experiment([*overrides, f"training.load_dir={load_dir}"]), print_fn=lambda _: None
        )
        trainer.setup()
        trainer.consumed_samples = (
            0  # the original resumes at iteration ITERS: the same batch as the import's
        )
        metrics = trainer.train_step()
        grads = {n: p.main_grad.detach().clone() for n, p in trainer.model.named_parameters()}
        trainer.close()
        out[name] = {"metrics": metrics, "grads": grads}
    return out


def test_a_step_from_the_import_equals_the_step_from_the_original(trained):
    imported = trained["root"] / "imported_for_step"
    _ok(convert("import", str(trained["hf"]), "--out", str(imported), *trained["overrides"]))
    steps = run_distributed(
        _one_step_worker,
        1,
        trained["overrides"],
        str(trained["save_dir"]),
        str(imported),
        parallel=None,
        timeout=400,
    )[0]
    original, again = steps["original"], steps["imported"]
    losses = [k for k in original["metrics"] if k.endswith("loss")]
    assert {"lm loss", "mtp_1 loss", "mtp_2 loss"} <= set(losses)
    assert {k: original["metrics"][k] for k in losses} == {k: again["metrics"][k] for k in losses}
    assert sorted(original["grads"]) == sorted(again["grads"])
    assert len(original["grads"]) > 50
    for name, grad in original["grads"].items():
        assert torch.equal(grad, again["grads"][name]), name
    # The depths learn in this step (their gradients are compared, not all zero).
    assert all(original["grads"][n].abs().sum() > 0 for n in original["grads"] if ".eh_proj." in n)


# ------------------------------------------------------------------------------------------ bad input


def _nothing_left(parent: Path, out: Path) -> None:
    assert not out.exists()
    assert not [p.name for p in parent.iterdir() if p.name.startswith(f".{out.name}.tmp")]


def _bad(proc: subprocess.CompletedProcess, *needles: str) -> None:
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr[-3000:]
    for needle in needles:
        assert needle in lines[0], lines[0]


@pytest.mark.mcore_agnostic  # refused from the run's recorded config, before a tensor is read
def test_a_checkpoint_of_a_model_no_layout_expresses_is_refused_naming_the_field(tmp_path):
    """The toy/small shape (grouped-query attention, softmax routing), trained one iteration by the app."""
    train, valid = write_tiny_corpus(tmp_path / "corpus")
    proc = run_app(
        *[
            o
            for o in _run_overrides(train, valid)
            if not o.startswith(("experiment=", "training.lr", "training.train_iters"))
        ],
        "model=toy",
        "model.num_layers=2",
        "model.hidden_size=32",
        "model.ffn_hidden_size=64",
        "model.moe_ffn_hidden_size=32",
        "model.moe_shared_expert_size=32",
        "model.num_experts=4",
        "training.train_iters=1",
        "training.lr_warmup_iters=0",
        "training.save_interval=1",
        f"training.save_dir={tmp_path / 'ckpt'}",
        f"hydra.run.dir={tmp_path / 'run'}",
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = tmp_path / "hf"
    _bad(
        convert("export", "--checkpoint", str(tmp_path / "ckpt"), "--out", str(out)),
        "model.multi_latent_attention=False",
    )
    _nothing_left(tmp_path, out)


def test_bad_inputs_are_one_line_exit_2_and_nothing_is_written(trained, tmp_path):
    hf, overrides = trained["hf"], trained["overrides"]
    # An existing output directory (export and import): untouched.
    existing = tmp_path / "existing"
    existing.mkdir()
    (existing / "keep").write_text("x")
    _bad(convert("export", "--checkpoint", str(trained["save_dir"]), "--out", str(existing)), "exists")
    _bad(convert("import", str(hf), "--out", str(existing), *overrides), "exists")
    assert [p.name for p in existing.iterdir()] == ["keep"]

    out = tmp_path / "ckpt"
    # A truncated shard.
    truncated = tmp_path / "truncated"
    shutil.copytree(hf, truncated)
    shard = next(truncated.glob("model-*.safetensors"))
    shard.write_bytes(shard.read_bytes()[:-1000])
    _bad(convert("import", str(truncated), "--out", str(out), *overrides), shard.name, "truncated")
    _nothing_left(tmp_path, out)
    # A missing index beside the shards.
    no_index = tmp_path / "no_index"
    shutil.copytree(hf, no_index)
    (no_index / "model.safetensors.index.json").unlink()
    _bad(
        convert("import", str(no_index), "--out", str(out), *overrides),
        "model.safetensors.index.json is missing",
    )
    _nothing_left(tmp_path, out)
    # The run's model differs from the checkpoint's (shapes): named field by field.
    _bad(
        convert("import", str(hf), "--out", str(out), *overrides, "model.hidden_size=64"),
        "hidden_size=128",
        "64",
    )
    _bad(
        convert("import", str(hf), "--out", str(out), *overrides, "model.num_experts=4"), "n_routed_experts=8"
    )
    _nothing_left(tmp_path, out)
