"""The app served on loopback for the tests: tiny weights, CPU, a temporary presets folder."""

from __future__ import annotations

import os
import socket

import pytest


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def sample_inputs(tmp_path_factory):
    """(drive.mp4 of 8 frames at 25 fps with audio, actor.png): the sample clip and photo."""
    from render.storyboard import save_image
    from retarget.samples import sample_actor, write_sample_drive

    d = tmp_path_factory.mktemp("app_inputs")
    drive, actor = d / "drive.mp4", d / "actor.png"
    write_sample_drive(drive, seconds=0.32)
    save_image(actor, sample_actor())
    return drive, actor


@pytest.fixture(scope="module")
def served(tiny_weights, tmp_path_factory):
    """(url, demo): the app on 127.0.0.1, one per test module. The app keeps its models loaded
    (a process-wide switch) and the presets folder comes from the environment: both are put back
    at the end, so that no other test sees them."""
    from retarget.run import keep_models_loaded

    os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"
    old = os.environ.get("RETARGET_PRESETS")
    os.environ["RETARGET_PRESETS"] = str(tmp_path_factory.mktemp("presets"))
    from retarget.app.config import AppOptions
    from retarget.app.layout import build_app

    cfg = AppOptions(device="cpu", sessions_dir=str(tmp_path_factory.mktemp("sessions")), max_video_s=5,
                     max_upload_mb=20)
    demo = build_app(cfg, tiny_weights)
    port = _free_port()
    demo.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, ssr_mode=False, quiet=True,
                show_error=True)
    yield f"http://127.0.0.1:{port}/", demo
    demo.close()
    demo.retarget_app.sessions.close()
    keep_models_loaded(False)
    if old is None:
        os.environ.pop("RETARGET_PRESETS", None)
    else:
        os.environ["RETARGET_PRESETS"] = old
