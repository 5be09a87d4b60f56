"""`retarget eval` on real faces: the astronaut (skimage, public domain) and the sample driving clip
made from it, whose mouth follows a known curve (`retarget.samples.mouth_opening`)."""

from __future__ import annotations

import base64
import json
import re
from pathlib import Path

import numpy as np
import pytest

from render.errors import RetargetError
from retarget.evaluate import EvalInputs, EvalOptions, evaluate, write_outputs
from retarget.evaluate import geometry as geo
from retarget.evaluate.judges import SAME_PERSON_THRESHOLD, DlibJudge, distance
from retarget.evaluate.stats import correlation, second_difference_rms
from retarget.evaluate.timing import NearestFrame, nearest_indices
from retarget.samples import mouth_opening

SIZE, FPS, SECONDS = 128, 25.0, 2.0
GEOMETRY_ONLY = dict(smirk=False, arcface=False, identity=False)


def _write(path: Path, frames, fps: float) -> Path:
    from render.video import VideoWriter

    with VideoWriter(path, fps) as w:
        for rgb in frames:
            w.write(rgb)
    return path


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    """The sample clip at 25 fps, the same performance at 12.5 fps, the clip started 5 frames
    late, a copy with 5 grey frames (no face), and the actor photo."""
    from render.storyboard import save_image
    from retarget.samples import sample_actor, sample_driving_frames

    root = tmp_path_factory.mktemp("eval_clips")
    frames = [rgb for _, rgb in sample_driving_frames(SECONDS, FPS, SIZE)]
    half = [rgb for _, rgb in sample_driving_frames(SECONDS, FPS / 2, SIZE)]
    blank = [np.full_like(f, 128) if 20 <= i < 25 else f for i, f in enumerate(frames)]
    actor = root / "actor.png"
    save_image(actor, sample_actor())
    return {
        "drive": _write(root / "drive.mp4", frames, FPS),
        "half": _write(root / "half.mp4", half, FPS / 2),
        "shifted": _write(root / "shifted.mp4", frames[5:], FPS),
        "blank": _write(root / "blank.mp4", blank, FPS),
        "actor": actor,
    }


@pytest.fixture(scope="module")
def self_eval(clips, tiny_weights):
    """The clip judged against itself, with every judge (SMIRK and ArcFace on the tiny weights)."""
    return evaluate(EvalInputs(clips["drive"], clips["drive"], clips["actor"]), EvalOptions(),
                    weights=tiny_weights, progress=False)


def _geometry_eval(clips, tiny_weights, name, **kw):
    return evaluate(EvalInputs(clips[name], clips["drive"], clips["actor"]), EvalOptions(**GEOMETRY_ONLY, **kw),
                    weights=tiny_weights, progress=False)


# --------------------------------------------------------------------------- the judges on real faces

def test_descriptor_keeps_the_astronaut_under_the_threshold(astronaut_rgb):
    """Shifted, scaled to 0.7, rotated 10 degrees, JPEG quality 30 and mirrored: still the same person."""
    import cv2

    judge = DlibJudge()
    img = astronaut_rgb
    ref = judge.descriptor(img, judge.face(img))
    ok, jpg = cv2.imencode(".jpg", img[:, :, ::-1], [cv2.IMWRITE_JPEG_QUALITY, 30])
    variants = {
        "shifted": np.ascontiguousarray(np.roll(img, (24, 40), axis=(0, 1))),
        "scaled": cv2.resize(img, (358, 358), interpolation=cv2.INTER_AREA),
        "rotated": cv2.warpAffine(img, cv2.getRotationMatrix2D((256.0, 200.0), 10.0, 1.0), (512, 512)),
        "jpeg30": np.ascontiguousarray(cv2.imdecode(jpg, cv2.IMREAD_COLOR)[:, :, ::-1]),
        "mirrored": np.ascontiguousarray(img[:, ::-1]),
    }
    assert distance(ref, judge.descriptor(img, judge.face(img))) == 0.0
    dists = {k: distance(ref, judge.descriptor(v, judge.face(v))) for k, v in variants.items()}
    assert all(0.0 < d < SAME_PERSON_THRESHOLD for d in dists.values()), dists


def test_head_pose_sees_an_in_plane_rotation(astronaut_rgb):
    import cv2

    judge = DlibJudge()
    face = judge.face(astronaut_rgb)
    M = cv2.getRotationMatrix2D(tuple(float(v) for v in face.centre), 10.0, 1.0)  # counter-clockwise on screen
    rotated = cv2.warpAffine(astronaut_rgb, M, (512, 512), borderMode=cv2.BORDER_REFLECT)
    p0 = geo.head_pose(face.lmk68, (512, 512))
    p1 = geo.head_pose(judge.face(rotated).lmk68, (512, 512))
    assert abs(abs(p1[2] - p0[2]) - 10.0) < 2.5, (p0, p1)
    assert abs(p1[0] - p0[0]) < 4 and abs(p1[1] - p0[1]) < 4, (p0, p1)


def test_head_pose_follows_the_sample_clip_rotation(self_eval):
    """The clip turns only in the image plane (6 degrees, period 1.7 s) while the mouth moves: roll
    follows the rotation one for one, yaw and pitch stay put (measured spread 1.9 and 1.5 degrees)."""
    pf = self_eval.per_frame
    angle = 6.0 * np.sin(2 * np.pi * pf["time_s"] / 1.7)  # counter-clockwise on screen
    assert np.polyfit(angle, pf["drive_roll"], 1)[0] == pytest.approx(-1.0, abs=0.1)
    assert np.std(pf["drive_yaw"]) < 3.0 and np.std(pf["drive_pitch"]) < 3.0


def test_mouth_signal_follows_the_sample_clip_curve(self_eval):
    pf = self_eval.per_frame
    assert correlation(pf["out_mouth_open"], mouth_opening(pf["time_s"])) >= 0.9


def test_landmark_distance_is_zero_for_the_same_points_and_grows_with_the_mouth(astronaut_rgb):
    lmk = DlibJudge().face(astronaut_rgb).lmk68.astype(np.float64)
    assert max(geo.landmark_distance(lmk, lmk).values()) < 1e-9
    # A similarity of the whole face is aligned away; moving the lower lip is not.
    theta = np.deg2rad(7)
    R = np.array([[np.cos(theta), -np.sin(theta)], [np.sin(theta), np.cos(theta)]])
    moved = lmk @ R.T * 1.3 + [11, -4]
    assert geo.landmark_distance(moved, lmk)["all"] < 1e-6
    opened = lmk.copy()
    opened[55:60] += [0, 0.1 * geo.interocular(lmk)]
    d = geo.landmark_distance(opened, lmk)
    assert d["mouth"] > 0.02 and d["eyes"] < 1e-3


# --------------------------------------------------------------------------- a clip against itself, shifted, resampled

def test_clip_against_itself(self_eval):
    m = self_eval.metrics
    assert m["frames"]["both_faces"] == 50
    assert m["geometry"]["lmd"]["all"] == pytest.approx(0.0, abs=1e-9)  # the similarity fit rounds at 1e-16
    assert all(s["corr"] == pytest.approx(1.0, abs=1e-9) for s in m["geometry"]["signals"].values())
    assert m["temporal"]["flicker"]["ratio"] == pytest.approx(1.0, abs=1e-9)
    assert m["temporal"]["jitter_landmarks"]["ratio"] == pytest.approx(1.0, abs=1e-9)
    assert m["pose"]["apd_vs_drive"]["mean"] == pytest.approx(0.0, abs=1e-9)  # solvePnP's own rounding
    assert m["smirk"]["error_55"] == pytest.approx(0.0, abs=1e-7)
    # the mirrored astronaut (the clip) against the astronaut (the actor): the same person
    assert m["identity"]["distance"]["mean"] < SAME_PERSON_THRESHOLD
    assert m["identity"]["same_person_share"] == 1.0
    assert m["identity"]["arcface"]["note"].endswith("meaningless")  # tiny weights are labelled


def test_a_shift_of_five_frames_drops_the_correlations(clips, tiny_weights, self_eval):
    shifted = _geometry_eval(clips, tiny_weights, "shifted")
    g = shifted.metrics["geometry"]
    # the mouth period is 25 frames: 5 frames late is 72 degrees of phase, cos 72 = 0.31
    assert g["signals"]["mouth_open"]["corr"] < 0.6
    assert g["corr_mean"] < self_eval.metrics["geometry"]["corr_mean"] - 0.2
    assert g["lmd"]["mouth"] > 0.005


def test_half_rate_output_is_matched_by_time(clips, tiny_weights, self_eval):
    half = _geometry_eval(clips, tiny_weights, "half")
    pf = half.per_frame
    assert len(pf["time_s"]) == 25
    assert list(pf["drive_index"]) == [2 * i for i in range(25)]
    mouth = half.metrics["geometry"]["signals"]["mouth_open"]
    assert mouth["corr"] > 0.95 and mouth["mae"] < 0.02
    # matched by index, the same frames would disagree: frame i of the output is frame 2i of the clip
    by_index = correlation(pf["out_mouth_open"], self_eval.per_frame["out_mouth_open"][:25])
    assert by_index < mouth["corr"] - 0.3


def test_output_frames_without_a_face_are_reported(clips, tiny_weights, tmp_path):
    result = evaluate(EvalInputs(clips["blank"], clips["drive"], clips["actor"]),
                      EvalOptions(every=4, smirk=False, arcface=False), weights=tiny_weights, progress=False)
    fr = result.metrics["frames"]
    assert fr["judged"] == 13  # frames 0, 4, ..., 48
    assert fr["output_no_face"]["count"] == 2  # frames 20 and 24 of the grey 20-24
    assert fr["output_no_face"]["times"] == [0.8, 0.96]
    assert np.isnan(result.per_frame["identity_distance"][5:7]).all()
    assert np.isfinite(result.per_frame["identity_distance"][[4, 7]]).all()
    assert result.metrics["identity"]["distance"]["frames"] == 11
    paths = write_outputs(result, tmp_path / "report")
    assert (tmp_path / "report" / "plots" / "strip_no_face.png").is_file()
    assert "output frames without a face" in paths["report"].read_text()


def test_relative_mode_measures_change_from_the_neutral_frame(clips, tiny_weights):
    result = _geometry_eval(clips, tiny_weights, "drive", relative=True, neutral_frame=12, every=2)
    g = result.metrics["geometry"]
    assert g["mode"] == "relative" and g["neutral"]["drive_index"] == 12
    assert all(s["mae"] == pytest.approx(0.0, abs=1e-12) for s in g["signals"].values())
    # the default neutral (no track): the judged driving frame with the most closed mouth
    auto = _geometry_eval(clips, tiny_weights, "half", relative=True)
    i = int(np.nanargmin(auto.per_frame["drive_mouth_open"]))
    assert auto.metrics["geometry"]["neutral"]["drive_index"] == auto.per_frame["drive_index"][i]
    assert auto.metrics["geometry"]["signals"]["mouth_open"]["mae"] < 0.02


def test_track_params_are_the_smirk_target(clips, tiny_weights, tmp_path):
    from tracking.tracker import TrackOptions, track_video

    track = track_video(clips["drive"], smirk_path=tiny_weights / "smirk/SMIRK_em1.pt",
                        options=TrackOptions(smoothing="none"), progress=False)
    path = track.save(tmp_path / "drive.track.npz")
    opts = EvalOptions(every=3, identity=False, arcface=False)
    result = evaluate(EvalInputs(clips["half"], clips["drive"], clips["actor"], track=path), opts,
                      weights=tiny_weights, progress=False)
    s = result.metrics["smirk"]
    assert s["target"].startswith("track file drive.track.npz")
    assert result.metrics["inputs"]["track"]["weights_id"] == track.weights_id
    # The track's params are taken at the output's times: the half-rate clip (the same faces at
    # the same times, encoded again) is closer to them than the clip started 5 frames late
    # (measured 0.53 vs 0.85 with the tiny encoder, whose outputs move ~0.5 a frame).
    late = evaluate(EvalInputs(clips["shifted"], clips["drive"], clips["actor"], track=path), opts,
                    weights=tiny_weights, progress=False)
    assert s["error_55"] < 0.8 * late.metrics["smirk"]["error_55"]


# --------------------------------------------------------------------------- the whole report on tiny weights

@pytest.fixture(scope="module")
def tiny_run_report(clips, tiny_weights, tmp_path_factory):
    """`retarget run --eval` on the tiny weights (1 s of the clip, 1 step): the report beside the output."""
    from retarget.cli import main

    root = tmp_path_factory.mktemp("tiny_run")
    drive = _write(root / "drive.mp4", _first_second(clips["drive"]), FPS)
    out = root / "out.mp4"
    rc = main(["run", str(drive), str(clips["actor"]), "-o", str(out), "--weights", str(tiny_weights),
               "--steps", "1", "--batch", "13", "--device", "cpu", "--eval"])
    assert rc == 0
    return out, root / "out.eval"


def _first_second(path):
    from render.video import open_video

    return [f.rgb for f in open_video(path).frames(end_s=1.0)]


def test_tiny_run_report_is_complete(tiny_run_report):
    out, report = tiny_run_report
    m = json.loads((report / "metrics.json").read_text())
    assert m["format"] == "retarget-eval" and m["version"] == 1
    assert m["settings"]["tiny_weights"] is True
    assert m["inputs"]["output"]["sha256"] and m["inputs"]["params"]["rows"] == 25
    assert m["frames"]["judged"] == 25 and m["frames"]["matched"] == 25
    assert m["judges"]["dlib_resnet"]["independent"] and not m["judges"]["smirk"]["independent"]
    assert m["smirk"]["target"] == "the parameters the run rendered"
    for section in ("identity", "geometry", "pose", "smirk", "temporal"):
        assert "judge" in m[section]
    # every frame either has a face or is listed as having none: nothing silently dropped
    assert m["identity"]["distance"]["frames"] + m["frames"]["output_no_face"]["count"] == 25
    html = (report / "report.html").read_text()
    plots = sorted((report / "plots").glob("*.png"))
    referenced = re.findall(r'data-file="(plots/[^"]+\.png)"', html)
    assert {"plots/identity.png", "plots/geometry.png", "plots/pose.png", "plots/smirk.png",
            "plots/flicker.png", "plots/lmd.png"} <= set(referenced)
    assert sorted(referenced) == sorted(f"plots/{p.name}" for p in plots)
    # each plot sits in its own section, under that section's table
    for plot, section, following in (("geometry", "<h2>Expression geometry", "<h2>SMIRK"),
                                     ("pose", "<h2>Head pose", "<h2>Temporal")):
        assert html.index(section) < html.index(f'data-file="plots/{plot}.png"') < html.index(following)
    for p in plots:  # each file exists and is embedded byte for byte (the page is self-contained)
        assert base64.b64encode(p.read_bytes()).decode() in html
    rows = (report / "per_frame.csv").read_text().splitlines()
    assert len(rows) == 26 and rows[0].startswith("time_s,")


def test_json_flag_prints_only_the_metrics(clips, tiny_weights, tmp_path, capsys):
    from retarget.cli import main

    rc = main(["eval", str(clips["half"]), "--drive", str(clips["drive"]), "--actor", str(clips["actor"]),
               "-o", str(tmp_path / "r"), "--weights", str(tiny_weights), "--no-smirk", "--no-arcface",
               "--every", "5", "--json"])
    assert rc == 0
    m = json.loads(capsys.readouterr().out)
    assert m["frames"]["judged"] == 5 and m["smirk"] is None and m["judges"]["arcface"] is None


# --------------------------------------------------------------------------- bad inputs: one line, no model loaded

@pytest.fixture()
def no_models(monkeypatch):
    """Any model load fails the test: errors must come first."""
    import retarget.evaluate.judges as judges
    import tracking.smirk as smirk

    def boom(*a, **k):
        raise AssertionError("a model was loaded before the input error")

    monkeypatch.setattr(judges.DlibJudge, "__init__", boom)
    monkeypatch.setattr(smirk, "load_smirk_encoder", boom)


def test_bad_inputs_give_one_error_line(clips, tiny_weights, tmp_path, capsys, no_models):
    from retarget.cli import main
    from tracking.track import Track

    other = Track(raw=np.zeros((3, 55), np.float32), params=np.zeros((3, 55), np.float32), valid=np.ones(3, bool),
                  times=np.arange(3) / 25.0, fps=25.0, source="other.mp4", source_sha256="0" * 64, backend="dlib",
                  weights_id="x", smoothing={"method": "none"})
    track = other.save(tmp_path / "other.track.npz")
    not_image = tmp_path / "actor.png"
    not_image.write_text("not an image")
    a_file = tmp_path / "report"
    a_file.write_text("")
    base = [str(clips["drive"]), "--drive", str(clips["drive"]), "--actor", str(clips["actor"]),
            "--weights", str(tiny_weights)]
    cases = {
        "missing output": ([str(tmp_path / "none.mp4")] + base[1:], "does not exist"),
        "missing drive": (base[:2] + [str(tmp_path / "none.mp4")] + base[3:], "--drive"),
        "actor not an image": (base[:4] + [str(not_image)] + base[5:], "not a readable image"),
        "track of another video": (base + ["--track", str(track)], "another video"),
        "every 0": (base + ["--every", "0"], "--every"),
        "report is a file": (base + ["-o", str(a_file)], "is a folder"),
        "start past the end": (base + ["--start", "9"], "past the end"),
        "report is an input": (base + ["-o", str(clips["drive"])], "-o"),
    }
    for name, (argv, words) in cases.items():
        rc = main(["eval"] + argv)
        err = capsys.readouterr().err.strip().splitlines()
        assert rc != 0 and len(err) == 1 and err[0].startswith("error:") and words in err[0], (name, err)


def test_rendered_params_must_match_the_output(clips, tiny_weights, no_models):
    with pytest.raises(RetargetError, match="rendered parameter rows"):
        evaluate(EvalInputs(clips["drive"], clips["drive"], clips["actor"], params=np.zeros((7, 55))),
                 weights=tiny_weights, progress=False)


# --------------------------------------------------------------------------- small pieces

def test_nearest_frame_matches_by_time_and_refuses_far_times():
    class F:
        def __init__(self, i):
            self.index, self.time_s = i, i * 0.04

    cursor = NearestFrame((F(i) for i in range(10)), tolerance=0.021)
    assert [cursor.at(t).index for t in (0.0, 0.081, 0.099, 0.2)] == [0, 2, 2, 5]
    assert cursor.at(0.5) is None
    assert list(nearest_indices(np.arange(10) * 0.04, np.array([0.0, 0.079, 0.5]), 0.021)) == [0, 2, -1]


def test_jitter_is_zero_for_steady_motion_and_sees_noise():
    t = np.linspace(0, 1, 50)
    assert second_difference_rms(3 * t) == pytest.approx(0.0, abs=1e-12)
    noise = np.random.default_rng(0).standard_normal(50) * 0.01
    assert second_difference_rms(3 * t + noise) > 0.015
