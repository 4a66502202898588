"""Live sources: newest-frame capture, drop accounting, a real MJPEG stream over loopback, the viewer
page in a real browser, and the one-line errors. Every loop here is bounded in frames and seconds."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import threading
import time
import urllib.request

import cv2
import numpy as np
import pytest

from cli_helpers import assert_error, assert_ok, cli
from polyprune.errors import ConfigError
from polyprune.export import synthetic_image
from polyprune.live import LiveCapture, is_live_source, run_live
from polyprune.predictor import Predictor
from polyprune.serve import FrameServer, parse_address

FRAMES = [cv2.cvtColor(synthetic_image(96, 128, seed=s), cv2.COLOR_RGB2BGR) for s in range(5)]


class FakeCamera:
    """OpenCV's capture interface: `n` frames at `fps` (0: as fast as they are asked for)."""

    def __init__(self, n: int = 50, fps: float = 25.0) -> None:
        self.n, self.fps, self.i, self.t0 = n, fps, 0, None
        self.released = False

    def read(self):
        self.t0 = self.t0 or time.perf_counter()
        if self.i >= self.n:
            return False, None
        if self.fps:
            time.sleep(max(0.0, self.t0 + self.i / self.fps - time.perf_counter()))
        self.i += 1
        return True, FRAMES[self.i % len(FRAMES)]

    def get(self, prop):
        return self.fps if prop == cv2.CAP_PROP_FPS else 0.0

    def release(self):
        self.released = True


def test_live_sources_are_recognized():
    for s in ("0", "3", "/dev/video0", "rtsp://cam/1", "http://127.0.0.1:8080/x.mjpg", "HTTPS://a/b"):
        assert is_live_source(s)
    for s in ("clip.mp4", "images/", "/dev/sda", "video0"):
        assert not is_live_source(s)
    assert parse_address("8080") == ("127.0.0.1", 8080)
    assert parse_address("0.0.0.0:81") == ("0.0.0.0", 81)
    with pytest.raises(ConfigError, match="PORT"):
        parse_address("host:http")


def test_capture_hands_out_only_the_newest_frame_and_counts_the_rest():
    cam = FakeCamera(n=200, fps=0)  # a source far faster than its consumer
    cap = LiveCapture(cam).start()
    taken = []
    while (f := cap.newest(timeout=2)) is not None:
        taken.append(f.index)
        time.sleep(0.01)  # a slow segmentation
    cap.stop()
    assert cap.captured == 200 and cam.released
    assert taken == sorted(set(taken)) and len(taken) < 200  # increasing, never a stale frame twice
    assert taken[-1] == 199  # the last frame read is the one the consumer ends on


def test_run_live_at_source_rate_records_serves_and_summarizes(model_file, tmp_path):
    got: dict = {}

    def viewer(url: str) -> None:
        def fetch() -> None:
            time.sleep(0.3)
            got["page"] = urllib.request.urlopen(url, timeout=5).read().decode()
            with urllib.request.urlopen(url + "stream.mjpg", timeout=5) as r:
                got["stream"] = r.read(2000)

        threading.Thread(target=fetch, daemon=True).start()

    with Predictor(model_file) as p:
        r = run_live(
            p, "fake", capture=FakeCamera(n=40), serve="127.0.0.1:0", record=tmp_path / "rec.mp4",
            on_serve=viewer, out_dir=tmp_path / "out",
        )  # fmt: skip
    assert r["kind"] == "live" and r["frames"] + r["dropped"] == r["captured"] == 40
    # 25 FPS against a ~5 ms model: little to drop, even with a second test worker busy on the other core
    assert r["dropped"] <= 8
    lat = r["latency_ms"]
    assert 0 < lat["median"] <= lat["p90"] <= lat["p99"] <= lat["max"] < 1000
    assert r["frames_sent"] > 0 and r["latency_to_sent_ms"]["median"] >= 0
    assert "polyprune live" in got["page"] and got["stream"].startswith(b"--polypruneframe")
    cap = cv2.VideoCapture(str(tmp_path / "rec.mp4"))
    n = 0
    while cap.read()[0]:
        n += 1
    assert n == r["frames"]  # one recorded frame per segmented frame
    assert json.loads((tmp_path / "out" / "predict.json").read_text())["frames"] == r["frames"]


def test_ctrl_c_ends_with_the_summary(model_file, monkeypatch):
    with Predictor(model_file) as p:
        real, calls = p.predict, {"n": 0}

        def predict(rgb):
            calls["n"] += 1
            if calls["n"] == 6:
                raise KeyboardInterrupt
            return real(rgb)

        monkeypatch.setattr(p, "predict", predict)
        r = run_live(p, "fake", capture=FakeCamera(n=100))
    assert r["interrupted"] and r["frames"] == 5


def _mjpeg_source(n_frames: int, fps: float = 25.0) -> tuple[FrameServer, threading.Thread]:
    """A network camera on loopback: `n_frames` JPEGs at `fps`, then the server stops (the stream ends)."""
    srv = FrameServer("127.0.0.1", 0).start()

    def feed() -> None:
        time.sleep(0.3)  # the client connects first
        for i in range(n_frames):
            _, jpg = cv2.imencode(".jpg", FRAMES[i % len(FRAMES)])
            srv.publish(jpg.tobytes(), i + 1)
            time.sleep(1 / fps)
        time.sleep(0.3)
        srv.close()

    t = threading.Thread(target=feed, daemon=True)
    t.start()
    return srv, t


def test_cli_reads_an_mjpeg_stream_until_it_stops(model_file, tmp_path, capsys):
    srv, feeder = _mjpeg_source(30)
    url = srv.url + "stream.mjpg"
    rc, out, err = cli(capsys, "predict", "--model", model_file, "--source", url, "--json", "-")
    feeder.join(timeout=10)
    assert rc == 0 and "Traceback" not in err, err
    r = json.loads(out)
    assert r["source"] == url and 0 < r["frames"] <= r["captured"] <= 30  # ended by the stream, no error


def test_cli_live_errors_are_one_line(model_file, tmp_path, capsys):
    assert_error(cli(capsys, "predict", "--model", model_file, "--source", "7"), "camera 7")
    assert_error(
        cli(capsys, "predict", "--model", model_file, "--source", "http://127.0.0.1:9/none.mjpg"),
        "http://127.0.0.1:9/none.mjpg",
    )
    assert_error(cli(capsys, "predict", "--model", model_file, "--source", "0", "--show"), "--serve")
    assert_error(cli(capsys, "predict", "--model", model_file, "--source", "0", "--serve", "x:y"), "PORT")
    video = tmp_path / "a.mp4"
    assert_error(
        cli(capsys, "predict", "--model", model_file, "--source", video, "--out", tmp_path, "--serve", "0"),
        "live sources",
    )
    assert_error(cli(capsys, "predict", "--model", model_file, "--source", video), "--out")


def test_cli_live_summary_line(model_file, capsys):
    srv, feeder = _mjpeg_source(15)
    err = assert_ok(cli(capsys, "predict", "--model", model_file, "--source", srv.url + "stream.mjpg"))
    feeder.join(timeout=10)
    assert "capture -> overlay median" in err and "dropped" in err


def _chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


def test_viewer_page_in_a_real_browser(model_file, tmp_path):
    """Headless Chromium loads the page, its stats line fills in, and the MJPEG image changes."""
    browser = _chromium()
    if browser is None:
        if os.environ.get("CI"):
            pytest.fail("chromium is not installed (.ci/run installs Debian's chromium)")
        pytest.skip("chromium not installed")
    urls: list[str] = []
    with Predictor(model_file) as p:
        run = threading.Thread(
            target=lambda: urls.append(
                run_live(
                    p, "fake", capture=FakeCamera(n=400, fps=25), serve="127.0.0.1:0", on_serve=urls.append
                )
            ),
            daemon=True,
        )
        run.start()
        for _ in range(100):
            if urls:
                break
            time.sleep(0.05)
        url = urls[0]
        args = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--virtual-time-budget=4000"]
        dom = subprocess.run([*args, "--dump-dom", url], capture_output=True, text=True, timeout=60).stdout
        shots = []
        for k in range(2):
            png = tmp_path / f"view{k}.png"
            subprocess.run(
                [*args, f"--screenshot={png}", "--window-size=400,300", url], capture_output=True, timeout=60
            )
            shots.append(cv2.imread(str(png)))
        run.join(timeout=30)
    assert "polyprune live" in dom
    stats = dom.split('id="stats"', 1)[1].split("</div>", 1)[0]
    assert "FPS" in stats and "dropped" in stats and "waiting" not in stats, stats
    assert all(s is not None for s in shots)
    assert np.abs(shots[0].astype(int) - shots[1].astype(int)).sum() > 0  # the image updates
