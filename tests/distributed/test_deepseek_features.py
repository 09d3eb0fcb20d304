"""DeepSeek-V3's attention and routing through the plugin's own config path and training loop.

`transformer_config_from` turns the model dataclass into Megatron's MLATransformerConfig with sigmoid,
bias-balanced, node-limited routing; the trunk and every MTP depth are MLA layers with that router; and
the training loop's `finalize_model_grads` (Megatron's) moves the aux-loss-free balancing bias of every
router, the MTP depths' included, after each global batch.
"""

from __future__ import annotations

import pytest
from distributed_utils import run_distributed
from megatron_cpu import TINY_MLA_FIELDS, TINY_SIGMOID_ROUTER_FIELDS
from train_tiny import tiny_experiment, tiny_model_config, write_tiny_corpus

pytestmark = [pytest.mark.megatron, pytest.mark.distributed]

BIAS_UPDATE_RATE = 1e-3


def deepseek_tiny_model():
    """The tiny corpus's model with DeepSeek-V3's features (the parity test's MLA and router fields): MLA
    (q LoRA, latent norms, YaRN), 8 experts in 4 groups (a token's 4 experts from at most 2 groups),
    sigmoid scores with the balancing bias, weights x 2.5, the sequence-wise aux loss, 1 shared expert,
    a dense first layer."""
    router = {**TINY_SIGMOID_ROUTER_FIELDS, "moe_router_num_groups": 4, "moe_router_group_topk": 2}
    return tiny_model_config(
        num_layers=3,
        num_experts=8,
        moe_router_topk=4,
        moe_ffn_hidden_size=16,
        moe_shared_expert_size=16,
        first_dense_layers=1,
        moe_token_dispatcher_type="allgather",
        multi_latent_attention=True,
        moe_router_bias_update_rate=BIAS_UPDATE_RATE,
        **TINY_MLA_FIELDS,
        **router,
    )


def _bias_worker(train_prefix: str, valid_prefix: str) -> dict:

    from mtp_plugin.train.loop import Trainer

    cfg = tiny_experiment(train_prefix, valid_prefix, train_iters=2)
    cfg.model = deepseek_tiny_model()
    trainer = Trainer(cfg, print_fn=lambda _line: None)
    trainer.setup()
    model, config = trainer.model, trainer.tf_config
    trunk_moe = model.decoder.layers[-1]
    depth = model.mtp_stack.depths[0].block.layer
    structure = {
        "config": type(config).__name__,
        "rope_type": config.rope_type,
        "trunk_attention": [type(layer.self_attention).__name__ for layer in model.decoder.layers],
        "depth_attention": type(depth.self_attention).__name__,
        "first_mlp": type(model.decoder.layers[0].mlp).__name__,
        "routers": [
            (r.score_function, r.config.moe_router_num_groups, r.config.moe_router_group_topk, r.topk)
            for r in (trunk_moe.mlp.router, depth.mlp.router)
        ],
        "shared_experts": depth.mlp.shared_experts is not None,
    }
    routers = {name: module for name, module in model.named_modules() if name.endswith("mlp.router")}
    biases = []
    for _ in range(2):
        trainer.train_step()
        biases.append({name: r.expert_bias.detach().clone() for name, r in routers.items()})
    trainer.close()
    return {"structure": structure, "biases": biases, "depths": cfg.mtp.num_depths}


def test_deepseek_config_builds_mla_sigmoid_layers_and_training_moves_the_bias(tmp_path):
    import torch

    train, valid = write_tiny_corpus(tmp_path / "corpus")
    (out,) = run_distributed(_bias_worker, 1, train, valid, timeout=240)
    s = out["structure"]
    assert s["config"] == "MLATransformerConfig" and s["rope_type"] == "yarn"
    assert s["trunk_attention"] == ["MLASelfAttention"] * 3
    assert s["depth_attention"] == "MLASelfAttention"  # an MLA trunk gives MLA MTP blocks
    assert s["first_mlp"] == "MLP"  # the dense first layer
    assert s["routers"] == [("sigmoid", 4, 2, 4)] * 2 and s["shared_experts"]
    first, second = out["biases"]
    # Two trunk MoE layers and one per depth; finalize_model_grads moved every one of them.
    assert len(first) == 2 + out["depths"]
    assert any("mtp_stack" in name for name in first)
    rate = BIAS_UPDATE_RATE
    for name in first:
        # Each update adds rate * sign(mean load - expert's load): steps of exactly the rate.
        steps_1 = first[name] / rate
        steps_2 = (second[name] - first[name]) / rate
        for steps in (steps_1, steps_2):
            torch.testing.assert_close(steps, steps.round(), rtol=0, atol=1e-3, msg=name)
            assert steps.abs().max() <= 1 + 1e-3, name
        assert steps_1.abs().sum() > 0, f"{name}: the balancing bias did not move"
