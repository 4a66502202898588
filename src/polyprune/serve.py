"""`--serve [HOST:]PORT`: the live overlay as an MJPEG stream over HTTP, with one small viewer page.

    GET /             HTML page: the stream and live FPS, latency and dropped-frame counts
    GET /stream.mjpg  multipart/x-mixed-replace JPEG frames, the newest one each time (a slow viewer
                      skips frames; it never slows the segmentation down)
    GET /stats.json   the live numbers the page shows

The standard library's ThreadingHTTPServer (one thread per connection, daemon threads). Binds to
127.0.0.1 unless told otherwise; another address gets a warning, since the stream shows patient video.
"""

from __future__ import annotations

import ipaddress
import json
import threading
import time
import warnings
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from polyprune.errors import ConfigError

BOUNDARY = "polypruneframe"
PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>polyprune live</title>
<style>body{font-family:sans-serif;background:#111;color:#eee;margin:1em}img{max-width:100%;border:1px solid #444}
#stats{font-size:1.1em;margin:.5em 0}</style></head>
<body><h1>polyprune live</h1>
<div id="stats">waiting for frames...</div>
<img id="view" src="/stream.mjpg" alt="live overlay">
<script>
async function poll() {
  try {
    const s = await (await fetch('/stats.json', {cache: 'no-store'})).json();
    document.getElementById('stats').textContent =
      `frames ${s.frames} | ${s.fps.toFixed(1)} FPS | latency ${s.latency_ms.toFixed(1)} ms ` +
      `(median ${s.latency_ms_median.toFixed(1)}) | dropped ${s.dropped}`;
    document.getElementById('stats').dataset.frames = s.frames;
  } catch (e) {}
  setTimeout(poll, 500);
}
poll();
</script></body></html>
"""


def parse_address(spec: str) -> tuple[str, int]:
    """'8080' -> ('127.0.0.1', 8080); 'HOST:PORT' as given. ConfigError for anything else."""
    host, _, port = spec.rpartition(":")
    host = host.strip("[]") or "127.0.0.1"
    if not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ConfigError(f"--serve takes [HOST:]PORT with a port in 0..65535, got {spec!r}")
    return host, int(port)


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class FrameServer:
    """Holds the newest JPEG and serves it; `publish` never blocks on a viewer."""

    def __init__(
        self, host: str = "127.0.0.1", port: int = 0, stats: Callable[[], dict[str, Any]] | None = None
    ):
        if not _is_loopback(host):
            warnings.warn(
                f"--serve binds to {host}: anyone who can reach this address sees the video",
                UserWarning,
                stacklevel=2,
            )
        self._jpeg: bytes | None = None
        self._seq = 0
        self._cond = threading.Condition()
        self.stats = stats or dict
        self._closed = False
        self.sent_at: dict[int, float] = {}  # frame seq -> first time a viewer got it (perf_counter)
        try:
            self.httpd = ThreadingHTTPServer((host, port), self._handler())
        except OSError as exc:
            raise ConfigError(f"--serve cannot listen on {host}:{port}: {exc.strerror or exc}") from exc
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(target=self.httpd.serve_forever, name="polyprune-serve", daemon=True)

    @property
    def address(self) -> tuple[str, int]:
        host, port = self.httpd.server_address[:2]
        return str(host), int(port)

    @property
    def url(self) -> str:
        host, port = self.address
        return f"http://{host}:{port}/"

    def start(self) -> FrameServer:
        self.thread.start()
        return self

    def publish(self, jpeg: bytes, seq: int) -> None:
        with self._cond:
            self._jpeg, self._seq = jpeg, seq
            self._cond.notify_all()

    def next_frame(self, after: int, timeout: float = 1.0) -> tuple[int, bytes | None]:
        """(seq, jpeg) of a frame newer than `after`, or (after, None) on timeout / close."""
        with self._cond:
            self._cond.wait_for(
                lambda: self._closed or (self._jpeg is not None and self._seq > after), timeout
            )
            if self._closed or self._jpeg is None or self._seq <= after:
                return after, None
            return self._seq, self._jpeg

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        self.httpd.shutdown()
        self.httpd.server_close()

    def __enter__(self) -> FrameServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:  # no access log on stderr
                pass

            def do_GET(self) -> None:
                path = self.path.split("?", 1)[0]
                if path in ("/", "/index.html"):
                    self._send(200, "text/html; charset=utf-8", PAGE.encode())
                elif path == "/stats.json":
                    self._send(200, "application/json", json.dumps(server.stats()).encode())
                elif path == "/stream.mjpg":
                    self._stream()
                else:
                    self._send(404, "text/plain", b"not found\n")

            def _send(self, code: int, kind: str, body: bytes) -> None:
                self.send_response(code)
                self.send_header("Content-Type", kind)
                self.send_header("Content-Length", str(len(body)))
                self.send_header("Cache-Control", "no-store")
                self.end_headers()
                self.wfile.write(body)

            def _stream(self) -> None:
                self.send_response(200)
                self.send_header("Content-Type", f"multipart/x-mixed-replace; boundary={BOUNDARY}")
                self.send_header("Cache-Control", "no-store")
                self.end_headers()
                seq = 0
                try:
                    while not server._closed:
                        seq, jpeg = server.next_frame(seq)
                        if jpeg is None:
                            continue
                        head = (
                            f"--{BOUNDARY}\r\nContent-Type: image/jpeg\r\nContent-Length: {len(jpeg)}\r\n\r\n"
                        )
                        self.wfile.write(head.encode() + jpeg + b"\r\n")
                        self.wfile.flush()
                        server.sent_at.setdefault(seq, time.perf_counter())
                except (BrokenPipeError, ConnectionResetError):  # the viewer went away
                    return

        return Handler
