"""`retarget app` as a user starts it: it serves the page on loopback, and bad settings or a
weights folder without the models end with one `error:` line before anything is served."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _cli(*args, **kw):
    env = {**os.environ, "GRADIO_ANALYTICS_ENABLED": "False", "PYTHONPATH": os.getcwd()}
    return subprocess.Popen([sys.executable, "-m", "retarget.cli", "app", *args], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)


def test_app_serves_on_loopback(tiny_weights):
    port = _free_port()
    proc = _cli("--weights", str(tiny_weights), "--device", "cpu", "--port", str(port))
    try:
        deadline, page = time.time() + 120, None
        while time.time() < deadline and proc.poll() is None:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=5) as r:
                    page = r.read().decode("utf-8", "replace")
                break
            except OSError:
                time.sleep(0.5)
        assert page is not None, proc.stderr.read() if proc.poll() is not None else "no answer"
        assert "gradio" in page.lower()
    finally:
        proc.terminate()
        proc.wait(30)


def test_app_refuses_bad_settings_and_missing_weights(tmp_path):
    for args, message in ((["--port", "70000"], "--port 70000: use 1-65535"),
                          (["--max-video-s", "0"], "--max-video-s must be > 0"),
                          (["--weights", str(tmp_path)], "arc2face")):
        proc = _cli(*args)
        out, err = proc.communicate(timeout=120)
        assert proc.returncode != 0 and err.startswith("error: ") and message in err, err
        assert len(err.strip().splitlines()) == 1
