"""Each tab's function through Gradio's own Python client, on the tiny weights, bad uploads included."""

from __future__ import annotations

import numpy as np
from pathlib import Path
import pytest


@pytest.fixture(scope="module")
def client(served):
    from gradio_client import Client

    return Client(served[0], verbose=False)


def _video(value) -> str:
    return value["video"] if isinstance(value, dict) else value


def test_retarget_tab_renders_the_clip(client, sample_inputs):
    from gradio_client import handle_file

    from render.video import open_video

    drive, actor = sample_inputs
    status, video, preview, files = client.predict(
        handle_file(str(drive)), handle_file(str(actor)), "fast", False, 1.0, 1.0, 1.0, 0.8, 0, 0, 0,
        api_name="/retarget")
    assert status.startswith("done: 8 frames")
    out = open_video(_video(video))
    assert out.frame_count == 8 and out.has_audio
    assert open_video(_video(preview)).frame_count == 8
    assert len(files) == 2


def _error(excinfo) -> str:
    return str(excinfo.value)


def test_bad_uploads_give_the_cli_messages(client, sample_inputs, tmp_path):
    from gradio_client import handle_file

    drive, actor = sample_inputs
    broken = tmp_path / "broken.mp4"
    broken.write_bytes(b"\x00not a video" * 200)
    with pytest.raises(Exception) as e:
        client.predict(handle_file(str(broken)), handle_file(str(actor)), "fast", False, 1.0, 1.0, 1.0, 0.8, 0, 0, 0,
                       api_name="/retarget")
    assert _error(e).startswith("error: ") and "broken.mp4" in _error(e) and "\n" not in _error(e)

    blank = tmp_path / "blank.png"
    from render.storyboard import save_image

    save_image(blank, np.full((256, 256, 3), 128, np.uint8))
    with pytest.raises(Exception) as e:
        client.predict(handle_file(str(drive)), handle_file(str(blank)), "fast", False, 1.0, 1.0, 1.0, 0.8, 0, 0, 0,
                       api_name="/retarget")
    assert _error(e).startswith("error: ") and "face" in _error(e)

    with pytest.raises(Exception) as e:
        client.predict(handle_file(str(drive)), handle_file(str(actor)), "fast", False, 1.0, 1.0, 1.0, 0.8, 0.3, 0.1, 0,
                       api_name="/retarget")
    assert "end 0.1s must be after start 0.3s" in _error(e)


def test_upload_limits(sample_inputs, tmp_path):
    """Type, size and duration limits, checked before anything runs (configurable)."""
    from render.errors import RetargetError
    from retarget.app.config import AppOptions
    from retarget.app.uploads import check_photo, check_video

    drive, actor = sample_inputs
    with pytest.raises(RetargetError, match=r"0 s is over the 0.1 s limit"):
        check_video(drive, AppOptions(max_video_s=0.1))
    with pytest.raises(RetargetError, match=r"over the 0.01 MB limit"):
        check_photo(actor, AppOptions(max_upload_mb=0.01))
    with pytest.raises(RetargetError, match=r"512x512 is over the 256 px limit"):
        check_photo(actor, AppOptions(max_photo_px=256))
    text = tmp_path / "notes.txt"
    text.write_text("hello")
    with pytest.raises(RetargetError, match=r"\.txt is not accepted"):
        check_photo(text, AppOptions())
    assert check_video(drive, AppOptions()) == drive


def test_client_cannot_name_a_server_path(client, sample_inputs):
    """A file the client did not upload is refused by gradio; a source text naming a path is refused by us."""
    from retarget.app.sources_in_app import app_spec
    from render.errors import RetargetError

    drive, actor = sample_inputs
    forged = {"path": "/etc/hostname", "meta": {"_type": "gradio.FileData"}, "orig_name": "actor.png"}
    with pytest.raises(Exception):
        client.predict(forged, forged, "fast", False, 1.0, 1.0, 1.0, 0.8, 0, 0, 0, api_name="/retarget")
    for text in ("/etc/hosts.jpg", "../actor.png", "~/smile.jpg", "sub/clip.mp4@1"):
        with pytest.raises(RetargetError, match="not a path"):
            app_spec(text, {"actor.png": actor}, where="panel 1")
    with pytest.raises(RetargetError, match="no uploaded file is called 'smile.jpg'"):
        app_spec("smile.jpg", {"actor.png": actor}, where="panel 2")
    assert app_spec("actor.png", {"actor.png": actor}, where="panel 3") == str(actor)
    assert app_spec("drive.mp4@0.2", {"drive.mp4": drive}, where="panel 4") == f"{drive}@0.2"
    assert app_spec("jaw_open", {}, where="panel 5") == "jaw_open"


def test_studio_reads_renders_and_saves_presets(client, served, sample_inputs, tiny_weights):
    from gradio_client import handle_file

    from retarget.presets import PresetLibrary
    from retarget.sources import resolve_specs
    from retarget.weights import WeightsLayout

    drive, actor = sample_inputs
    out = client.predict("photo", None, handle_file(str(actor)), None, 0, api_name="/read_expression")
    want = resolve_specs([str(actor)], layout=WeightsLayout(tiny_weights))[0]
    jaw, eye_l, eye_r, *coeffs = out[1:]  # (the gr.State output is not part of the API)
    # The same path as `retarget track` on that photo: equal up to float32 -> JSON float64.
    np.testing.assert_allclose([jaw, eye_l, eye_r, *coeffs], [want[52], want[50], want[51], *want[:10]], rtol=1e-6)

    out = client.predict("preset", "jaw_open", None, None, 0, api_name="/read_expression")
    jaw_open = PresetLibrary().get("jaw_open").params
    assert abs(out[1] - jaw_open[52]) < 1e-6

    status, png = client.predict(handle_file(str(actor)), "fast", 0.3, 0.0, 1.0, *[0.0] * 10,
                                 api_name="/studio")
    from PIL import Image

    assert Image.open(png).size == (512, 512)  # pasted back into the 512x512 photo

    status, _ = client.predict("crooked", "from the app", 0.2, 0.5, 0.0, 1.5, *[0.0] * 9,
                               api_name="/save_preset")
    assert status == "saved preset 'crooked'"
    saved = PresetLibrary().get("crooked").params
    assert saved[52] == np.float32(0.2) and saved[50] == np.float32(0.5) and saved[0] == np.float32(1.5)
    status, _ = client.predict("crooked", "", 0.1, 0.0, 0.0, *[0.0] * 10, api_name="/save_preset")
    assert status == "replaced preset 'crooked'"
    with pytest.raises(Exception) as e:
        client.predict("jaw_open", "", 0.1, 0.0, 0.0, *[0.0] * 10, api_name="/save_preset")
    assert "built in" in str(e.value)


def _args(drive, actor, mode="fast"):
    from gradio_client import handle_file

    return (handle_file(str(drive)), handle_file(str(actor)), mode, False, 1.0, 1.0, 1.0, 0.8, 0, 0, 0)


def _wait_for(fn, timeout=120.0):
    import time

    end = time.time() + timeout
    while time.time() < end:
        if fn():
            return True
        time.sleep(0.05)
    return False


def test_one_gpu_job_at_a_time_others_wait_in_line(client, sample_inputs):
    from gradio_client.utils import Status

    first = client.submit(*_args(*sample_inputs), api_name="/retarget")
    assert _wait_for(lambda: first.status().code in (Status.PROCESSING, Status.ITERATING))
    second = client.submit(*_args(*sample_inputs), api_name="/retarget")
    waited = []
    assert _wait_for(lambda: waited.append(second.status()) or waited[-1].code == Status.IN_QUEUE
                     or first.done())
    assert waited[-1].code == Status.IN_QUEUE and waited[-1].rank == 0, waited[-1]  # first in line, position shown
    assert not first.done()
    assert first.result()[0].startswith("done: 8 frames") and second.result()[0].startswith("done: 8 frames")


def test_cancel_stops_the_job_and_frees_the_queue(client, served, sample_inputs):
    import threading

    from gradio_client.utils import Status

    demo = served[1]
    before = set(demo.retarget_app.sessions.root.rglob("out.mp4"))
    job = client.submit(*_args(*sample_inputs, mode="quality"), api_name="/retarget")  # 25 steps: slow enough
    assert _wait_for(lambda: job.status().code == Status.ITERATING)  # running, status lines flowing
    import re

    # The status line is the job's own progress bar while it renders: count, ETA and rate.
    progress = re.compile(r"rendering: .*\d+/8 \[\d+:\d+<\d+:\d+, .*frame/s\]")
    assert _wait_for(lambda: any(progress.search(str(o[0])) for o in job.outputs())), job.outputs()[-3:]
    job.cancel()
    assert _wait_for(lambda: not any(t.name == "retarget-app-job" and t.is_alive() for t in threading.enumerate()),
                     60), "the cancelled job's thread still runs"
    assert set(demo.retarget_app.sessions.root.rglob("out.mp4")) == before  # no output, not even a partial one
    assert not list(demo.retarget_app.sessions.root.rglob(".out.partial-*"))
    assert client.predict(*_args(*sample_inputs), api_name="/retarget")[0].startswith("done: 8 frames")


def test_storyboard_tab(client, sample_inputs):
    from gradio_client import handle_file
    from PIL import Image

    drive, actor = sample_inputs
    table = {"headers": ["source", "caption"], "data": [["jaw_open", "open"], ["actor.png", "as the photo"],
                                                        ["drive.mp4@0.2", "a moment"], ['{"jaw": 0.2}', "numbers"]]}
    status, sheet, files = client.predict(handle_file(str(actor)), [handle_file(str(actor)), handle_file(str(drive))],
                                          table, "fast", 2, api_name="/storyboard")
    assert status.startswith("done: 4 panels") and "/" not in status.split(";")[1]
    names = sorted(Path(f).name for f in files)
    assert sum(n.endswith(".png") for n in names) == 5 and any(n.endswith(".resolved.yaml") for n in names)
    assert Image.open(sheet).size[0] > 0

    table["data"].append(["smile.jpg", "missing"])
    with pytest.raises(Exception) as e:
        client.predict(handle_file(str(actor)), [handle_file(str(actor))], table, "fast", 2, api_name="/storyboard")
    assert str(e.value).startswith("error: panel 3") and "drive.mp4" in str(e.value)  # not uploaded this time


def test_transitions_tab(client, sample_inputs):
    from gradio_client import handle_file

    from render.video import open_video
    from tracking.track import Track

    drive, actor = sample_inputs
    table = {"headers": ["source", "time (s)", "hold (s)"],
             "data": [["neutral", 0, 0], ["actor.png", 0.2, 0.08], ['{"jaw": 0.3}', 0.36, 0]]}
    status, video, files = client.predict(handle_file(str(actor)), [handle_file(str(actor))], table, "smoothstep",
                                          25, "fast", api_name="/transition")
    n = open_video(_video(video)).frame_count
    assert status.startswith(f"done: {n} frames") and n == 10  # 0 .. 0.36 s at 25 fps
    track = Track.load(next(f for f in files if f.endswith(".track.npz")))
    assert len(track.times) == n and abs(track.params[-1, 52] - 0.3) < 1e-6  # the last key, exactly

    table["data"][1][1] = "soon"
    with pytest.raises(Exception) as e:
        client.predict(handle_file(str(actor)), [handle_file(str(actor))], table, "smoothstep", 25, "fast",
                       api_name="/transition")
    assert str(e.value).startswith("error: keyframe 2")
