"""The loss plot: one panel without MTP; with MTP also each depth's loss minus the main loss and each
depth's acceptance; a marker at the iteration where λ switches."""

from __future__ import annotations

import matplotlib.pyplot as plt
import pytest

from mtp_plugin.train import logs


def _history(num_iters: int, num_depths: int, switch_at: int) -> list[dict[str, float]]:
    history = []
    for it in range(1, num_iters + 1):
        h = {"iteration": float(it), "lm loss": 8.0 - 0.01 * it, "mtp lambda": 0.3 if it < switch_at else 0.1}
        for k in range(1, num_depths + 1):
            h[f"mtp_{k} loss"] = h["lm loss"] + 0.1 * k
            h[f"mtp_{k} acceptance"] = 0.01 * it / k
        history.append(h)
    return history


def _switch_lines(ax) -> list[float]:
    return [line.get_xdata()[0] for line in ax.get_lines() if line.get_gid() == "lambda-switch"]


def test_lambda_switches_are_found_where_lambda_changes():
    assert logs.lambda_switches(_history(30, 2, switch_at=21)) == [(21.0, 0.3, 0.1)]
    assert logs.lambda_switches(_history(10, 2, switch_at=99)) == []


@pytest.mark.parametrize("num_depths", [1, 2])
def test_mtp_figure_has_difference_and_acceptance_panels_and_marks_the_switch(num_depths):
    train = _history(30, num_depths, switch_at=21)
    valid = [{k: v for k, v in h.items() if k != "mtp lambda"} for h in train[9::10]]
    fig = logs.loss_figure(train, valid, num_depths)
    try:
        losses, diffs, acceptance = fig.axes
        assert [_switch_lines(ax) for ax in fig.axes] == [[21.0]] * 3
        assert "mtp_k loss - lm loss" in diffs.get_ylabel() and "acceptance" in acceptance.get_ylabel()
        # Panel 2 holds depth k's loss minus the main loss: 0.1 * k here (raw and smoothed curves).
        for k in range(1, num_depths + 1):
            (curve,) = [line for line in diffs.get_lines() if line.get_label() == f"mtp_{k} loss - lm loss"]
            assert list(curve.get_ydata()) == pytest.approx([0.1 * k] * 30)
        assert {t.get_text() for t in losses.get_legend().get_texts()} >= {"lm loss", "mtp_1 loss"}
    finally:
        plt.close(fig)


def test_figure_without_mtp_is_one_panel(tmp_path):
    train = _history(12, 0, switch_at=99)
    fig = logs.loss_figure(train, [], 0)
    assert len(fig.axes) == 1 and _switch_lines(fig.axes[0]) == []
    plt.close(fig)
    path = logs.plot_loss_curves(train, [], 0, tmp_path / "png" / "loss_curves.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_run_log_prints_and_appends_to_the_file(tmp_path, capsys):
    path = tmp_path / "run" / "train.log"
    log = logs.RunLog(path)
    assert not path.exists()  # opened at the first line only
    log(" iteration 1/2 | lm loss: 1.0 |")
    logs.to_file(log, " written by a progress bar")
    logs.startup(log, True, "building the model")
    logs.startup(log, False, "not on this rank")
    lines = path.read_text().splitlines()
    assert lines[:2] == [" iteration 1/2 | lm loss: 1.0 |", " written by a progress bar"]
    assert lines[2].endswith("] building the model") and len(lines) == 3
    assert capsys.readouterr().out.splitlines()[0] == " iteration 1/2 | lm loss: 1.0 |"
