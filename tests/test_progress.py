"""Progress where stderr is a log file: a plain line per interval and one at the end, never silence."""

from __future__ import annotations

from polyprune import progress


def test_a_log_file_gets_a_line_per_interval_and_one_at_the_end(capsys, monkeypatch):
    clock = iter([0.0] + [10.0 * i for i in range(1, 11)] + [100.0, 100.0])
    monkeypatch.setattr(progress.time, "monotonic", lambda: next(clock))
    monkeypatch.setattr(progress, "LINE_INTERVAL_S", 30.0)
    with progress.progress_bar(10, "epoch 1/3") as bar:  # pytest's stderr is no terminal
        for _ in range(10):
            bar.advance(loss="0.5")  # t = 10, 20, ... 100 s
        bar.set(val_dice="0.9")
    lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert lines[0] == "epoch 1/3: 3/10  0:00:30 (~0:01:10 left)  loss 0.5"
    assert len(lines) == 4  # 30, 60, 90 s, and the end
    assert lines[-1] == "epoch 1/3: 10/10  0:01:40  val_dice 0.9"


def test_disabled_bars_print_nothing(capsys):
    with progress.progress_bar(3, "x", enabled=False) as bar:
        bar.advance(3)
    assert capsys.readouterr().err == ""
