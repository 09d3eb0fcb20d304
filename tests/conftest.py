"""Test-wide setup. Its presence puts tests/ on sys.path (pytest's default "prepend" import mode), so
test modules and spawned worker processes can `import megatron_cpu, distributed_utils`."""

from __future__ import annotations

import time
from collections import Counter, defaultdict

import pytest


class FileProgress:
    """One line per test file as its last test finishes: `make test` runs quietly in two pytest-xdist workers,
    whose output is otherwise a row of dots for many minutes. Works with and without xdist (the controller
    learns the test ids from the workers' collection; a plain run from its own)."""

    def __init__(self, config: pytest.Config):
        self.config = config
        self.left: Counter[str] = Counter()
        self.outcomes: dict[str, Counter[str]] = defaultdict(Counter)
        self.total = 0
        self.done = 0
        self.start = time.monotonic()

    def _expect(self, nodeids) -> None:
        if self.total:  # every xdist worker reports the same collection
            return
        for nodeid in nodeids:
            self.left[nodeid.split("::")[0]] += 1
        self.total = sum(self.left.values())

    def pytest_collection_finish(self, session: pytest.Session) -> None:
        if not self.config.pluginmanager.hasplugin("dsession"):  # not the xdist controller
            self._expect(item.nodeid for item in session.items)

    @pytest.hookimpl(optionalhook=True)
    def pytest_xdist_node_collection_finished(self, node, ids) -> None:
        self._expect(ids)

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        if report.when == "call" or (report.when == "setup" and not report.passed):
            self.outcomes[report.fspath][report.outcome] += 1
        if report.when != "teardown" or report.fspath not in self.left:
            return
        self.left[report.fspath] -= 1
        self.done += 1
        if self.left[report.fspath] == 0:
            counts = ", ".join(
                f"{n} {outcome}" for outcome, n in sorted(self.outcomes[report.fspath].items())
            )
            elapsed = time.monotonic() - self.start
            reporter = self.config.pluginmanager.get_plugin("terminalreporter")
            line = f"[{self.done}/{self.total} {elapsed:5.0f} s] {report.fspath}: {counts}"
            if reporter is not None:
                reporter.ensure_newline()
                reporter.write_line(line)


def pytest_configure(config: pytest.Config) -> None:
    if not hasattr(config, "workerinput"):  # the controller (or a plain run) reports; workers stay quiet
        config.pluginmanager.register(FileProgress(config), "file-progress")
