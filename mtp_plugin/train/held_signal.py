"""A SIGTERM held while a torchrun rank other than 0 checks its launch.

Under torchrun every rank checks the same configuration; rank 0 reports a refusal and exits 2, and torchrun
then stops the other ranks with SIGTERM. A rank still importing or composing at that moment (ranks start
seconds apart across nodes or on a loaded machine) would die of the signal before reaching the same
refusal, and torchrun's summary would list a signal instead of exit code 2. Such a rank holds a SIGTERM
until its checks end: refused, it exits 2 as rank 0 did (`hydra_app.report_refusal`); accepted, the held
signal is delivered then, with the default action it would have had, before any work starts.
"""

from __future__ import annotations

import os
import signal


def is_other_torchrun_rank() -> bool:
    """A torchrun worker other than rank 0 (the ranks that leave a launch refusal's line to rank 0)."""
    return "TORCHELASTIC_RUN_ID" in os.environ and int(os.environ.get("RANK", "0")) != 0


class HeldSigterm:
    def __init__(self) -> None:
        self.active = False
        self.arrived = False

    @classmethod
    def on_other_torchrun_ranks(cls) -> HeldSigterm:
        """Hold SIGTERM from now on in a torchrun rank other than 0; elsewhere nothing is held."""
        held = cls()
        if is_other_torchrun_rank():
            signal.signal(signal.SIGTERM, held._hold)
            held.active = True
        return held

    def _hold(self, signum, frame) -> None:
        self.arrived = True

    def release(self) -> None:
        """The launch checks passed: SIGTERM's default action again, and a held one delivered now."""
        if self.active:
            self.active = False
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            if self.arrived:
                signal.raise_signal(signal.SIGTERM)
