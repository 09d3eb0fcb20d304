"""`python -m mtp_plugin.train [group=option ...] [field=value ...]` (or under torchrun)."""

# The guard matters: dist_checkpointing's writer spawns a helper process that re-imports __main__, and
# that helper must keep SIGTERM's default action.
if __name__ == "__main__":
    from mtp_plugin.train.held_signal import HeldSigterm

    # Before the imports below (a second or more): a rank stopped by torchrun while still importing
    # reaches the refusal rank 0 reported and exits as rank 0 did (held_signal.py).
    held = HeldSigterm.on_other_torchrun_ranks()
    from mtp_plugin.train.hydra_app import main

    main(held=held)
