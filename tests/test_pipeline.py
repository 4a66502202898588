import pytest

from polyprune.pipeline import simulate_realtime


def test_simulate_realtime_by_hand():
    # 10 FPS (100 ms budget), every frame takes 250 ms, one waiting slot:
    # f0 served 0-250; f1 waits; f2 (t=200) finds the slot full -> dropped; f1 served 250-500;
    # f3 (t=300) waits; f4 (t=400) dropped; f3 served 500-750; f5 (t=500) waits, served 750-1000.
    rt = simulate_realtime([250.0] * 6, fps=10.0, queue_size=1)
    assert rt["dropped_indices"] == [2, 4] and rt["dropped"] == 2 and not rt["realtime"]
    assert rt["over_budget"] == 6
    assert rt["max_latency_ms"] == pytest.approx(500.0)  # f5: arrives 500, done 1000
    fast = simulate_realtime([40.0] * 50, fps=10.0, queue_size=1)
    assert fast["dropped"] == 0 and fast["realtime"] and fast["max_latency_ms"] == pytest.approx(40.0)
