"""An actor video as the target (retarget/retake.py), end to end on tiny weights (CPU), plus the parts
that need no model: the driver schedule, the edit's weight, face choices, sources.

Clips are a handful of frames (the suite runs on 2 cores). Outputs are compared through --frames-dir
(lossless PNGs of the frames handed to the encoder); the H.264 file is checked for count, rate, audio.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from render.errors import RetargetError
from retarget.retake import (
    EditOptions, RetakeOptions, driver_schedule, edit, edit_weight, is_video_actor, parse_edit_gain, retake,
    retake_params,
)
from retarget.run import RunOptions, read_image, run

FPS = 25.0
QUIET = dict(log=lambda *_: None)


def _save_frames(folder: Path, frames) -> Path:
    from render.storyboard import save_image

    folder.mkdir(parents=True, exist_ok=True)
    for i, f in enumerate(frames):
        save_image(folder / f"{i:03d}.png", f)
    return folder


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    """take.mp4: the sample clip (4 frames, AAC); drive3.mp4 (3 frames, audio); frame: its first frame
    decoded (160x160 RGB, one face); still/: a driver of 1 frame (a neutral driver, shorter than the take)."""
    from render.video import open_video
    from retarget.samples import write_sample_drive

    root = tmp_path_factory.mktemp("retake")
    take = write_sample_drive(root / "take.mp4", seconds=4 / FPS, fps=FPS, size=160)
    drive3 = write_sample_drive(root / "drive3.mp4", seconds=3 / FPS, fps=FPS, size=160)
    frames = [f.rgb for f in open_video(take)]
    still = _save_frames(root / "still", [frames[2][:, ::-1].copy()])
    return dict(root=root, take=take, drive3=drive3, frame=frames[0], frames=frames, still=still)


def _opts(tmp: Path, name: str, **kw) -> RunOptions:
    base = dict(steps=1, batch=4, device="cpu", frames_dir=str(tmp / f"{name}.frames"))
    base.update(kw)
    return RunOptions(**base)


def _frames(folder: str | Path) -> list[np.ndarray]:
    return [read_image(p) for p in sorted(Path(folder).glob("*.png"))]


def _video_info(path: Path) -> dict:
    import av

    with av.open(str(path)) as c:
        v = c.streams.video[0]
        n = sum(1 for _ in c.decode(v))
        a = c.streams.audio[0] if c.streams.audio else None
        return dict(frames=n, rate=float(v.average_rate), audio=None if a is None else a.codec_context.name,
                    audio_s=None if a is None or not a.duration else float(a.duration * a.time_base))


# --------------------------------------------------------------------------- no models

def test_is_video_actor(tmp_path):
    assert is_video_actor("take.mp4") and is_video_actor("take.MOV") and is_video_actor(tmp_path)
    assert not is_video_actor("actor.jpg") and not is_video_actor("actor.PNG")


def test_driver_schedule_each_end_mode():
    times = np.arange(3) / FPS  # a driver of 3 frames, the take has 7
    hold, sel = driver_schedule(times, FPS, n_out=7, out_fps=FPS, start=None, end=None, mode="hold")
    assert sel.all() and np.allclose(hold, np.arange(7) / FPS)  # sample_params holds past the end
    loop, _ = driver_schedule(times, FPS, n_out=7, out_fps=FPS, start=None, end=None, mode="loop")
    assert np.allclose(loop, [0, 1, 2, 0, 1, 2, 0] / np.float64(FPS))
    stop, _ = driver_schedule(times, FPS, n_out=7, out_fps=FPS, start=None, end=None, mode="stop")
    assert np.allclose(stop, np.arange(3) / FPS)
    with pytest.raises(RetargetError, match="--driver-end"):
        driver_schedule(times, FPS, n_out=7, out_fps=FPS, start=None, end=None, mode="bounce")


def test_retake_params_relative_and_driver_end():
    from tracking.track import Track

    rng = np.random.default_rng(0)
    drv = (rng.standard_normal((3, 55)) * 0.3).astype(np.float32)
    drv[:, 50:52] = [[0.1, 0.1], [0.5, 0.5], [0.9, 0.9]]
    drv[:, 52] = [0.0, 0.1, 0.2]
    track = Track(raw=drv, params=drv, valid=np.ones(3, bool), times=np.arange(3) / FPS, fps=FPS)
    own = np.zeros((7, 55), np.float32)
    own[:, 50:52] = 0.1
    own[:, 52] = 0.05
    opts = RunOptions(neutral_frame=0)
    gain = parse_edit_gain(None)
    hold, _, _ = retake_params(own, FPS, track, opts, RetakeOptions(), gain, log=lambda *_: None)
    assert hold.shape == (7, 55)
    np.testing.assert_allclose(hold[0], own[0], atol=1e-6)  # the driver's neutral leaves the take as it is
    np.testing.assert_allclose(hold[1, :50], drv[1, :50] - drv[0, :50], atol=1e-6)
    np.testing.assert_allclose(hold[2, 50:53], own[2, 50:53] + drv[2, 50:53] - drv[0, 50:53], atol=1e-6)
    np.testing.assert_allclose(hold[3:], np.repeat(hold[2:3], 4, axis=0), atol=1e-6)  # last frame held
    loop, _, _ = retake_params(own, FPS, track, opts, RetakeOptions(driver_end="loop"), gain, log=lambda *_: None)
    np.testing.assert_allclose(loop[3:6], hold[0:3], atol=1e-6)
    stop, _, _ = retake_params(own, FPS, track, opts, RetakeOptions(driver_end="stop"), gain, log=lambda *_: None)
    assert len(stop) == 3
    absolute, _, _ = retake_params(own, FPS, track, opts, RetakeOptions(absolute=True), gain, log=lambda *_: None)
    np.testing.assert_allclose(absolute[:3, :50], drv[:, :50], atol=1e-6)


def test_alignment_smoothing_cuts_jitter_without_lag():
    from retarget.retake import smooth_alignment

    rng = np.random.default_rng(1)
    t = np.arange(50) / FPS
    base = rng.uniform(40, 120, (68, 2)).astype(np.float32)
    moving = base[None] + (30.0 * t)[:, None, None]  # the head moves 30 px/s, steadily
    noisy = moving + rng.normal(0, 1.0, moving.shape)
    valid = np.ones(50, bool)
    valid[20:23] = False  # frames without the face: filled from their neighbours
    noisy[~valid] = np.nan
    out = smooth_alignment(noisy, valid, t)
    inner = slice(5, 45)
    err_raw = np.abs(noisy[inner][valid[inner]] - moving[inner][valid[inner]]).mean()
    err = np.abs(out[inner] - moving[inner]).mean()
    assert np.isfinite(out).all() and err < 0.6 * err_raw  # jitter cut (white noise: ~0.5x at 3 Hz)
    steady = smooth_alignment(moving, np.ones(50, bool), t)
    np.testing.assert_allclose(steady, moving, atol=1e-3)  # no lag on steady motion


def test_edit_weight_eases_and_is_zero_outside():
    u = np.arange(20) / 10.0  # 0 .. 1.9 s
    w = edit_weight(u, start=0.8, end=1.0, ease=0.3, length=2.0)
    assert np.all(w[(u >= 0.8 - 1e-9) & (u <= 1.0 + 1e-9)] == 1.0)
    assert np.all(w[(u <= 0.5 + 1e-9) | (u >= 1.3 - 1e-9)] == 0.0)
    inside = (u > 0.5 + 1e-9) & (u < 0.8 - 1e-9)
    assert np.all((w[inside] > 0) & (w[inside] < 1)) and np.all(np.diff(w[u < 0.85]) >= 0)
    with pytest.raises(RetargetError, match="after --end"):
        edit_weight(u, start=1.0, end=0.5, ease=0.0, length=2.0)


def test_parse_edit_gain_and_numbers_source():
    from retarget.retake import expression_source

    assert parse_edit_gain("0.5") == {"expression": 0.5, "eyelids": 0.5, "jaw": 0.5}
    assert parse_edit_gain("jaw=2")["jaw"] == 2.0 and parse_edit_gain("jaw=2")["expression"] == 1.0
    vec, _ = expression_source('{"jaw": 0.3, "eyelids": 1, "expression": {"3": 1.5}}', None, "cpu")
    assert vec[52] == pytest.approx(0.3) and vec[50] == vec[51] == 1.0 and vec[3] == 1.5
    assert expression_source("jaw_open", None, "cpu")[0][52] > 0
    with pytest.raises(RetargetError, match="--add"):
        expression_source('{"nose": 3}', None, "cpu")


def test_face_choice_parse_and_follow():
    from tracking.choice import FaceChoice, Subject, parse_face_choice
    from tracking.faces import Face

    assert parse_face_choice(None) == FaceChoice()
    assert parse_face_choice("2").rank == 2 and parse_face_choice("640,360").point == (640.0, 360.0)
    for bad in ("0", "-1", "left", "1,2,3"):
        with pytest.raises(RetargetError, match="--actor-face"):
            parse_face_choice(bad)

    def face(x0, size):
        box = np.array([x0, 10, x0 + size, 10 + size], np.float32)
        return Face(bbox=box, score=1.0, kps5=np.zeros((5, 2), np.float32), lmk68=None, landmarks=np.zeros((5, 2)))

    big, small = face(0, 100), face(300, 60)
    s = Subject(parse_face_choice("2"))
    assert s([big, small], 0.0) is small
    assert s([face(2, 100), face(303, 60)], 0.04).bbox[0] == 303  # follows it, not the larger face
    assert s([face(2, 100)], 0.08) is None  # lost: never the other face
    near = Subject(parse_face_choice("10,50"))
    assert near([small, big], 0.0) is big
    with pytest.raises(RetargetError, match="shows only 2"):
        Subject(parse_face_choice("3"))([big, small], 0.0)


# --------------------------------------------------------------------------- the pipeline

def test_frame_references_one_bank_row_per_frame(pipe, actor, face_crop, expressions, monkeypatch):
    """Equal crops give the photo path's latent and bank; different crops, different frames; the writer
    runs once for the batch, never in the denoising loop."""
    call = dict(steps=2, seed=3, guidance=3.0)
    other = np.ascontiguousarray(face_crop[::-1])  # another frame of the "video"
    writes = []
    real_write = pipe.write_bank
    monkeypatch.setattr(pipe, "write_bank", lambda z, e: writes.append(z.shape[0]) or real_write(z, e))
    framed = pipe.frame_references(actor, np.stack([face_crop, face_crop, other]), seed=7)
    assert writes == [3]
    assert framed.ref_latent.shape[0] == 3 and actor.bank is not framed.bank
    # the photo path's actor (conftest: make_actor(arcface, face_crop, seed=7)) holds one row
    np.testing.assert_allclose(framed.ref_latent[0:1].numpy(), actor.ref_latent.numpy(), atol=1e-5)
    for name, rows in framed.bank.states.items():
        np.testing.assert_allclose(rows[1:2].numpy(), actor.bank.states[name].numpy(), atol=1e-4)
    same = np.repeat(expressions[:1], 3, axis=0)
    out = pipe(framed, same, output_type="float", **call)
    photo = pipe(actor, same[:1], output_type="float", **call)
    # fp32 rows of a batch of 3 vs a batch of 1 differ by float order (~1e-6); the images are 0..1
    np.testing.assert_allclose(out[0], photo[0], atol=2e-4)
    np.testing.assert_allclose(out[1], photo[0], atol=2e-4)
    assert np.abs(out[2] - out[0]).max() > 1e-2  # same expression, other reference frame
    assert writes == [3]  # the 2-step loop wrote no bank
    with pytest.raises(RetargetError, match="reference bank holds 3 frames"):
        pipe(framed, expressions[:2], **call)


# --------------------------------------------------------------------------- end to end

def test_retake_frames_rate_audio_and_neutral_driver(clips, tiny_weights, tmp_path):
    """N actor frames -> N output frames at the actor's rate with the actor's audio; a neutral (still)
    driver shorter than the take holds and leaves the take's own expressions; edit with gain 0 renders the
    same; an edit over a range changes only the frames within [start - ease, end + ease]."""
    out = tmp_path / "retake.mp4"
    s = retake(clips["still"], clips["take"], out, _opts(tmp_path, "retake", preview="side-by-side"),
               weights=tiny_weights, **QUIET)
    info = _video_info(out)
    assert s.frames == info["frames"] == 4 == s.rendered and info["rate"] == pytest.approx(FPS)
    assert info["audio"] == "aac" and info["audio_s"] == pytest.approx(4 / FPS, abs=0.03)
    assert s.preview.is_file() and "mean ArcFace of 4 sharp frontal frames" in s.line()
    assert "0 actor frames without the face" in s.line()
    retaken = _frames(tmp_path / "retake.frames")

    e0 = edit(clips["take"], tmp_path / "e0.mp4", EditOptions(add='{"jaw": 0.3}', gain="0"),
              _opts(tmp_path, "e0"), weights=tiny_weights, **QUIET)
    np.testing.assert_allclose(e0.params, s.params, atol=1e-5)  # the still driver's change is ~0
    own = _frames(tmp_path / "e0.frames")
    for a, b in zip(own, retaken):
        assert np.abs(a.astype(int) - b.astype(int)).max() <= 2  # params equal to 1e-5: pixels within rounding

    e1 = edit(clips["take"], tmp_path / "e1.mp4", EditOptions(add='{"expression": {"0": 300, "1": -300, "2": 300}, "jaw": 0.2}',
                                                         start=0.12, end=0.12, ease=0.04),
              _opts(tmp_path, "e1"), weights=tiny_weights, **QUIET)
    edited = _frames(tmp_path / "e1.frames")
    assert np.array_equal(e1.params[:3], e0.params[:3])  # frame 2 is at 0.08 s = start - ease: weight 0
    for k in range(3):
        assert np.array_equal(edited[k], own[k])  # same batch shape, same rows: exact
    assert e1.params[3, 0] - e0.params[3, 0] == pytest.approx(300, abs=1e-3)  # weight 1 at start..end
    diff = int(np.abs(edited[3].astype(int) - own[3].astype(int)).max())
    assert diff > 5, diff  # (the tiny SMIRK's expressions are in the hundreds: a large offset shows)
    assert _video_info(tmp_path / "e1.mp4")["audio"] == "aac"


def test_retake_resume_and_fingerprints(clips, tiny_weights, tmp_path):
    out = tmp_path / "r.mp4"
    work = tmp_path / "work"
    opts = _opts(tmp_path, "r", keep_work=True, work=str(work), batch=2)
    first = retake(clips["drive3"], clips["take"], out, opts, RetakeOptions(driver_end="stop", audio="drive"),
                   weights=tiny_weights, **QUIET)
    info = _video_info(out)
    assert first.frames == info["frames"] == 3 and info["audio"] == "aac"  # stopped with the 3-frame driver
    assert info["audio_s"] == pytest.approx(3 / FPS, abs=0.03)
    before = _frames(tmp_path / "r.frames")
    (work / "frames" / "000002.png").unlink()
    opts.resume = True
    again = retake(clips["drive3"], clips["take"], out, opts, RetakeOptions(driver_end="stop", audio="drive"),
                   weights=tiny_weights, **QUIET)
    assert again.rendered == 1  # only the batch [2] is rendered again
    assert all(np.array_equal(a, b) for a, b in zip(_frames(tmp_path / "r.frames"), before))
    with pytest.raises(RetargetError, match="other settings.*drive"):
        retake(clips["still"], clips["take"], out, opts, RetakeOptions(driver_end="stop", audio="drive"),
               weights=tiny_weights, **QUIET)


def test_repeated_frame_equals_photo_path(clips, tiny_weights, tmp_path):
    from render.storyboard import save_image

    photo = tmp_path / "frame.png"
    save_image(photo, clips["frame"])
    folder = _save_frames(tmp_path / "still_take", [clips["frame"]] * 3)
    v = retake(clips["drive3"], folder, tmp_path / "v.mp4", _opts(tmp_path, "v"), RetakeOptions(absolute=True),
               weights=tiny_weights, **QUIET)
    p = run(clips["drive3"], photo, tmp_path / "p.mp4", _opts(tmp_path, "p"), weights=tiny_weights, **QUIET)
    np.testing.assert_allclose(v.params, p.params, atol=1e-5)
    video, still = _frames(tmp_path / "v.frames"), _frames(tmp_path / "p.frames")
    assert len(video) == len(still) == 3
    for a, b in zip(video, still):
        # the bank of 3 rows vs 1 and the batched VAE move fp32 by ~1e-6, a level at most after rounding
        assert np.abs(a.astype(int) - b.astype(int)).max() <= 2


def test_two_faces_actor_face_and_frames_without_face(clips, tiny_weights, tmp_path):
    f = clips["frame"]
    pair = np.ascontiguousarray(np.hstack([f, f[:, ::-1]]))  # two sample faces side by side, 320x160
    blank = np.full_like(pair, 128)
    folder = _save_frames(tmp_path / "pair", [pair, blank, pair])
    for name, point, keep in (("left", "80,80", slice(160, 320)), ("right", "240,80", slice(0, 160))):
        s = retake(clips["still"], folder, tmp_path / f"{name}.mp4", _opts(tmp_path, name),
                   RetakeOptions(actor_face=point), weights=tiny_weights, **QUIET)
        assert s.frames == 3 and s.no_face_frames == 1 and s.rendered == 2
        assert "1 actor frames without the face passed through" in s.line()
        out = _frames(tmp_path / f"{name}.frames")
        assert np.array_equal(out[1], blank)  # no face: passes through
        changed = slice(0, 160) if keep.start else slice(160, 320)
        for k in (0, 2):
            assert np.array_equal(out[k][:, keep], pair[:, keep])  # the other face is untouched
            assert np.abs(out[k][:, changed].astype(int) - pair[:, changed].astype(int)).max() > 5


def test_bad_actor_videos_fail_before_models_load(clips, tmp_path, monkeypatch, capsys, tiny_weights):
    import av

    from retarget import cli
    from retarget.pipeline import RetargetPipeline
    from retarget.samples import write_tone

    def no_models(*a, **k):
        raise AssertionError("the diffusion models were loaded")

    monkeypatch.setattr(RetargetPipeline, "from_weights", classmethod(no_models))
    no_face = _save_frames(tmp_path / "noface", [np.full((96, 96, 3), 90, np.uint8)] * 2)
    corrupt = tmp_path / "corrupt.mp4"
    corrupt.write_bytes(np.random.default_rng(0).bytes(4000))
    audio_only = tmp_path / "audio.m4a"
    write_tone(tmp_path / "tone.wav", 0.2)
    with av.open(str(tmp_path / "tone.wav")) as src, av.open(str(audio_only), "w", format="mp4") as dst:
        stream = dst.add_stream("aac", rate=44100)
        for frame in src.decode(audio=0):
            frame.pts = None
            for packet in stream.encode(frame):
                dst.mux(packet)
        for packet in stream.encode(None):
            dst.mux(packet)
    cases = {no_face: "no face found in any of the 2 frames", corrupt: "corrupt.mp4", audio_only: "audio.m4a"}
    for actor, words in cases.items():
        rc = cli.main(["run", str(clips["still"]), str(actor), "-o", str(tmp_path / "o.mp4"),
                       "--weights", str(tiny_weights), "--device", "cpu"])
        err = capsys.readouterr().err
        errors = [line for line in err.splitlines() if line.startswith("error:")]
        assert rc == 1 and len(errors) == 1 and "Traceback" not in err, err  # (the rest: progress bars)
        assert words in errors[0] or actor.name in errors[0], errors
    assert not (tmp_path / "o.mp4").exists()
    pair = _save_frames(tmp_path / "pair", [np.hstack([clips["frame"]] * 2)])
    rc = cli.main(["run", str(clips["still"]), str(pair), "-o", str(tmp_path / "o.mp4"), "--weights",
                   str(tiny_weights), "--device", "cpu", "--actor-face", "3"])
    assert rc == 1 and "--actor-face 3" in capsys.readouterr().err
    rc = cli.main(["run", str(clips["still"]), str(tmp_path / "noface" / "000.png"), "-o", str(tmp_path / "o.mp4"),
                   "--weights", str(tiny_weights), "--audio", "none"])
    assert rc == 1 and "--audio: for an actor video" in capsys.readouterr().err


def test_drive_face_follows_the_chosen_driver(clips, tiny_weights, tmp_path):
    """--drive-face X,Y tracks that face: its expressions equal those of the same video with the other
    face blanked out (the crops are the same pixels), and differ from the other face's."""
    from retarget.retake import _driver_track
    from retarget.run import WorkFolder
    from retarget.weights import WeightsLayout
    from tracking.choice import parse_face_choice

    a, b = clips["frames"][0], clips["frames"][3][:, ::-1]  # two faces with other expressions
    grey = np.full_like(a, 128)
    pair = _save_frames(tmp_path / "pair", [np.hstack([a, b])] * 2)
    right_only = _save_frames(tmp_path / "right", [np.hstack([grey, b])] * 2)
    layout, work = WeightsLayout(tiny_weights), WorkFolder(tmp_path / "work")

    def track(folder, which):
        return _driver_track(folder, parse_face_choice(which, "--drive-face"), layout, RunOptions(smooth="none"),
                             work, "cpu", lambda *_: None).params

    right = track(pair, "240,80")
    np.testing.assert_allclose(right, track(right_only, "1"), atol=2e-4)  # (tracked parameters: float order)
    assert np.abs(right - track(pair, "80,80")).max() > 1e-2


def test_identity_sources_match_the_photo_path(clips, tiny_weights, tmp_path, pipe):
    """--identity PHOTO, --identity-frame SEC and the default mean all embed a face as prepare_actor does."""
    from render.storyboard import save_image
    from render.video import open_video
    from retarget.retake import analyse_actor
    from retarget.weights import WeightsLayout
    from tracking.choice import FaceChoice

    layout = WeightsLayout(tiny_weights)
    photo = tmp_path / "frame1.png"
    save_image(photo, clips["frames"][1])
    expected = pipe.prepare_actor(clips["frames"][1], seed=0).arcface

    def take(**kw):
        ro = RetakeOptions(**kw)
        return analyse_actor(clips["take"], open_video(clips["take"]), FaceChoice(), layout, "cpu", RunOptions(),
                             ro, pipe.arcface, lambda *_: None)

    by_photo, by_frame, default = take(identity=str(photo)), take(identity_frame=0.05), take()
    np.testing.assert_allclose(by_photo.identity, expected, atol=1e-5)
    np.testing.assert_allclose(by_frame.identity, expected, atol=1e-5)  # 0.05 s: frame 1 (0.04 s) is nearest
    assert "photo frame1.png" in by_photo.identity_note and "actor frame 1 (0.04s" in by_frame.identity_note
    assert default.identity_note.startswith("mean ArcFace of 4") and np.linalg.norm(default.identity) == pytest.approx(1)
    with pytest.raises(RetargetError, match="--identity-frame 9: no frame with the face within"):
        take(identity_frame=9.0)
