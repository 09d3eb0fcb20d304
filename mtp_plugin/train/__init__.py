"""Training entry point and a lean training loop on megatron.core.

    python -m mtp_plugin.train experiment=toy_demo           # the Hydra app (mtp_plugin.train.hydra_app)
    torchrun --nproc-per-node 2 -m mtp_plugin.train parallel=pp2

Library use without Hydra: `mtp_plugin.train.loop.run(ExperimentConfig(...))`, or `Trainer` for control
over single steps. Only `hydra_app` and `__main__` import Hydra; nothing here imports Megatron until a
loop module is imported.
"""
