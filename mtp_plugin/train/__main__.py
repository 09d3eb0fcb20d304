"""`python -m mtp_plugin.train [group=option ...] [field=value ...]` (or under torchrun)."""

from mtp_plugin.train.hydra_app import main

# The guard matters: dist_checkpointing's writer spawns a helper process that re-imports __main__.
if __name__ == "__main__":
    main()
