"""`retarget eval`: one streaming pass over the output and its driving clip, matched by time,
then the metrics (numbers only) and what the report needs to draw them.

Order of work: every input is checked (files, formats, the track's source, the time ranges)
before any model loads; then dlib (and SMIRK, ArcFace where their files exist) judge each
sampled output frame and the driving frame nearest to it in time.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from render.errors import RetargetError
from retarget.evaluate import geometry as geo
from retarget.evaluate import stats
from retarget.evaluate.judges import SAME_PERSON_THRESHOLD, distance
from retarget.evaluate.temporal import face_patch, patch_change
from retarget.evaluate.timing import NearestFrame, match_tolerance

FORMAT = "retarget-eval"
VERSION = 1
SMIRK_CORRELATED = [(f"exp_{i}", i) for i in range(10)] + [("jaw_open", 52), ("eyelid_l", 50), ("eyelid_r", 51)]
PARTS = {"expression": slice(0, 50), "eyelids": slice(50, 52), "jaw": slice(52, 55)}
# A geometry signal "moves" in the driving clip when its standard deviation over the judged frames
# is at least MOVING_SNR times its frame-to-frame noise (estimated as the RMS second difference
# / sqrt(6), exact for white noise). The correlation of a signal that does not move is a
# correlation of landmark noise, so it stays out of the mean. Scale-free: landmark noise in
# inter-ocular distances grows as faces get smaller. The estimate needs dense frames (a real
# movement must change little between neighbours): with judged frames more than MOVING_MAX_STEP_S
# apart (--every N) no signal is classified and all enter the mean.
MOVING_SNR = 3.0
MOVING_MAX_STEP_S = 0.1
DRIVER_ID_EVERY = 10  # the driver's own identity distance (a reference number) on every 10th sample
SMIRK_BATCH = 16


@dataclass
class EvalOptions:
    """Options of `retarget eval` (the CLI is generated from these fields)."""

    every: int = field(default=1, metadata={"help": "judge every Nth output frame (long clips)", "metavar": "N"})
    start: float = field(default=0.0, metadata={
        "help": "driving-clip time of the output's first frame (the run's --start)", "metavar": "SEC"})
    relative: bool = field(default=False, metadata={
        "help": "geometry errors on each clip's change from its neutral frame (for --relative runs)"})
    neutral_frame: int | None = field(default=None, metadata={
        "help": "driving frame used as neutral with --relative (default: from --track as `run` picks it, "
                "else the frame with the most closed mouth)", "metavar": "N"})
    identity: bool = field(default=True, metadata={
        "help": "identity distances (dlib's descriptor, ~80 ms a frame on one CPU core; --no-identity skips them)"})
    smirk: bool = field(default=True, metadata={
        "help": "also re-track with SMIRK when smirk/SMIRK_em1.pt is in the weights folder"})
    arcface: bool = field(default=True, metadata={
        "help": "also report ArcFace cosine (the conditioning model's view) when arcface.onnx is present"})
    redetect_every: int = field(default=10, metadata={
        "help": "full face detection every N judged frames, the face followed in between (1: always detect)"})
    device: str = field(default="auto", metadata={"help": "where SMIRK runs", "choices": ("auto", "cpu", "cuda")})


@dataclass
class EvalInputs:
    """The files an evaluation reads. `params`: (frames, 55) vectors the run rendered, one per
    output frame (what `run --eval` passes); `track`: a track file whose params are sampled at
    the matched driving times instead."""

    output: Path
    drive: Path
    actor: Path
    track: Path | None = None
    params: np.ndarray | None = None

    def paths(self) -> list[Path]:
        """Every input path (for checks that an output does not overwrite one)."""
        return [Path(p) for p in (self.output, self.drive, self.actor, self.track) if p is not None]


@dataclass
class EvalResult:
    """metrics: the JSON-ready record (see README, "Evaluation"). per_frame: name -> (n,) array
    over the judged output frames. moments: frames worth looking at, dicts with `label`,
    `out_index`, `drive_index` (or None), `time_s`. frames: (label, driving RGB or None, output
    RGB) of those moments, filled by `grab_moments`."""

    metrics: dict
    per_frame: dict
    moments: list
    inputs: EvalInputs
    frames: list = field(default_factory=list)


# --------------------------------------------------------------------------- input checks

@dataclass
class _Opened:
    out: object
    drive: object
    actor_rgb: np.ndarray
    track: object | None


def check_inputs(inputs: EvalInputs, opts: EvalOptions, report_dir: Path | None = None) -> _Opened:
    """Open and cross-check every input; RetargetError (one line, naming the file or option)
    before any model is loaded."""
    from render.video import open_video
    from retarget.run import read_image

    if opts.every < 1:
        raise RetargetError(f"--every must be at least 1, got {opts.every}")
    if opts.redetect_every < 1:
        raise RetargetError(f"--redetect-every must be at least 1, got {opts.redetect_every}")
    if opts.start < 0:
        raise RetargetError(f"--start must be >= 0 seconds, got {opts.start}")
    for what, p in (("output video", inputs.output), ("--drive", inputs.drive), ("--actor", inputs.actor)):
        if not Path(p).exists():
            raise RetargetError(f"{what} {p} does not exist")
    readers = {}
    for what, p in (("output video", inputs.output), ("--drive", inputs.drive)):
        try:
            readers[what] = open_video(p)
        except RetargetError as e:
            raise RetargetError(f"{what}: {e}") from None
    out, drive = readers["output video"], readers["--drive"]
    actor_rgb = read_image(inputs.actor, "--actor photo")
    if report_dir is not None:
        report_dir = Path(report_dir)
        if report_dir.exists() and not report_dir.is_dir():
            raise RetargetError(f"-o {report_dir}: a file of that name exists; the report is a folder")
        from render.files import check_not_input

        # The folder, and the files it gets, are never an input (links and hard links included).
        for written in (report_dir, *(report_dir / n for n in ("metrics.json", "per_frame.csv", "report.html"))):
            check_not_input(written, inputs.paths(), option="-o")
    drive_end = drive.duration_s or drive.frame_count / max(drive.fps, 1e-6)
    if drive.kind == "image":
        drive_end = 1.0 / drive.fps
    if opts.start >= drive_end > 0:
        raise RetargetError(f"--start {opts.start:g}s is past the end of --drive {inputs.drive} ({drive_end:.2f}s)")
    if opts.neutral_frame is not None and drive.frame_count and not 0 <= opts.neutral_frame < drive.frame_count:
        raise RetargetError(f"--neutral-frame {opts.neutral_frame} is outside --drive's {drive.frame_count} frames")
    track = None
    if inputs.track is not None:
        from tracking.track import Track
        from tracking.tracker import source_sha256

        if not Path(inputs.track).is_file():
            raise RetargetError(f"--track {inputs.track} does not exist")
        track = Track.load(inputs.track)
        if track.source_sha256 and track.source_sha256 != source_sha256(inputs.drive):
            raise RetargetError(f"--track {inputs.track} was made from another video ({Path(track.source).name}) "
                                f"than --drive {inputs.drive}; pass the track of that clip, or none")
    if inputs.params is not None:
        p = np.asarray(inputs.params)
        if p.ndim != 2 or p.shape[1] != 55:
            raise RetargetError(f"rendered parameters must be (frames, 55), got {p.shape}")
        if out.frame_count and abs(len(p) - out.frame_count) > 1:
            raise RetargetError(f"{len(p)} rendered parameter rows for the {out.frame_count} frames of "
                                f"{inputs.output}: not the parameters of this output")
    return _Opened(out, drive, actor_rgb, track)


# --------------------------------------------------------------------------- per-frame observation

@dataclass
class _Obs:
    """What the judges saw in one frame (face None: no face found)."""

    face: object | None
    signals: np.ndarray = field(default_factory=lambda: np.full(len(geo.SIGNALS), np.nan))
    pose: np.ndarray = field(default_factory=lambda: np.full(3, np.nan))
    norm: np.ndarray = field(default_factory=lambda: np.full((68, 2), np.nan))
    patch: np.ndarray | None = None
    descriptor: np.ndarray | None = None
    arcface: np.ndarray | None = None
    smirk: np.ndarray = field(default_factory=lambda: np.full(55, np.nan, np.float32))


class _Side:
    """Follows one clip's subject through the judged frames (dlib tracker between detections)."""

    def __init__(self, judge, redetect_every: int):
        from tracking.tracker import FaceTracker

        self.judge = judge
        self.tracker = FaceTracker(judge.backend, redetect_every)
        self.previous = None
        self.count = 0

    def observe(self, rgb: np.ndarray, *, descriptor: bool) -> _Obs:
        from tracking.faces import follow_subject

        from retarget.evaluate.judges import most_confident

        faces = self.tracker(rgb, self.count)
        self.count += 1
        # The subject starts as the most confident face (see DlibJudge.face), then is followed.
        face = follow_subject(faces, self.previous) if self.previous is not None else most_confident(faces)
        if face is None:
            return _Obs(None)
        self.previous = face
        obs = _Obs(face, signals=geo.signals(face.lmk68), pose=geo.head_pose(face.lmk68, (rgb.shape[1], rgb.shape[0])),
                   norm=geo.normalised(face.lmk68), patch=face_patch(rgb, face.kps5))
        if descriptor:
            obs.descriptor = self.judge.descriptor(rgb, face)
        return obs


class _Smirk:
    """Re-tracks faces with the project's SMIRK encoder and crop (tracking.tracker.encoder_crop),
    batched. With MediaPipe's landmarker in the weights folder the crop comes from its landmarks,
    as in `retarget track`; otherwise from dlib's 68 points, as the tracker's dlib backend does."""

    def __init__(self, layout, device: str):
        import torch

        from tracking.smirk import load_smirk_encoder, weights_identity
        from tracking.tracker import resolve_device

        self.path = layout.require("smirk_ckpt")
        self.weights_id = weights_identity(self.path)
        self.encoder = load_smirk_encoder(self.path, device=resolve_device(device), dtype=torch.float32)
        landmarker = layout.optional("face_landmarker")
        self.mediapipe = None
        if landmarker is not None:
            from tracking.faces import MediaPipeBackend

            self.mediapipe = MediaPipeBackend(landmarker)
        self.backend = "mediapipe" if self.mediapipe else "dlib"
        self.pending: list[tuple[_Obs, np.ndarray]] = []

    def add(self, rgb: np.ndarray, obs: _Obs) -> None:
        from tracking.tracker import encoder_crop

        face = obs.face
        if self.mediapipe is not None:
            faces = self.mediapipe.detect(rgb)
            face = faces[0] if faces else None
        if face is None:
            return
        self.pending.append((obs, encoder_crop(rgb, face)))
        if len(self.pending) >= SMIRK_BATCH:
            self.flush()

    def flush(self) -> None:
        if self.pending:
            out = self.encoder.encode(np.stack([c for _, c in self.pending]))
            for (obs, _), vec in zip(self.pending, out):
                obs.smirk = vec
            self.pending.clear()


# --------------------------------------------------------------------------- the evaluation

def evaluate(inputs: EvalInputs, options: EvalOptions | None = None, *, weights=None, report_dir=None,
             progress: bool = True, log=print) -> EvalResult:
    """Judge an output video against its driving clip and actor photo.

    inputs: the files (and optionally the rendered parameters). weights: a WeightsLayout or
    folder (as for `retarget run`); SMIRK and ArcFace judge only when their files are there.
    report_dir: only checked here (not an input, not a file), written by `write_outputs`.
    Returns an EvalResult; raises RetargetError for bad or mismatched inputs (before loading
    any model) and when the actor photo shows no face.
    """
    from render.video import prefetch
    from retarget.evaluate.judges import ArcFaceJudge, DlibJudge
    from retarget.tiny import is_tiny
    from retarget.weights import WeightsLayout

    opts = options or EvalOptions()
    inputs = EvalInputs(Path(inputs.output), Path(inputs.drive), Path(inputs.actor),
                        Path(inputs.track) if inputs.track is not None else None, inputs.params)
    opened = check_inputs(inputs, opts, report_dir)
    layout = weights if isinstance(weights, WeightsLayout) else WeightsLayout(weights)
    tiny = is_tiny(layout.root)

    judge = DlibJudge()
    actor_face = judge.face(opened.actor_rgb)
    if actor_face is None:
        raise RetargetError(f"no face found in the --actor photo {inputs.actor} (dlib HOG detector)")
    actor_desc = judge.descriptor(opened.actor_rgb, actor_face)
    actor_pose = geo.head_pose(actor_face.lmk68, (opened.actor_rgb.shape[1], opened.actor_rgb.shape[0]))
    actor_signals = geo.signals(actor_face.lmk68)

    smirk = _Smirk(layout, opts.device) if opts.smirk and layout.exists("smirk_ckpt") else None
    arc = None
    if opts.arcface and layout.exists("arcface_onnx"):
        backend = None
        antelope = layout.optional("antelopev2")
        if antelope is not None and (Path(antelope) / "scrfd_10g_bnkps.onnx").is_file():
            from tracking.faces import InsightFaceBackend

            backend = InsightFaceBackend(antelope)
        arc = ArcFaceJudge(layout.require("arcface_onnx"), backend)
    actor_arc = None
    if arc is not None:
        face = arc.faces_for(opened.actor_rgb, actor_face)
        actor_arc = arc.actor_embedding(opened.actor_rgb, face, judge.backend) if face is not None else None

    out_side, drive_side = _Side(judge, opts.redetect_every), _Side(judge, opts.redetect_every)
    cursor = NearestFrame(prefetch(opened.drive.frames(), 8), match_tolerance(opened.drive.fps))
    rows: list[dict] = []
    last_drive: tuple[int, _Obs] | None = None
    from tqdm import tqdm

    total = opened.out.frame_count // opts.every if opened.out.frame_count else None
    bar = tqdm(total=total, unit="frame", desc=f"judging {inputs.output.name}", disable=not progress,
               dynamic_ncols=True)
    try:
        for frame in prefetch(opened.out.frames(), 8):
            if frame.index % opts.every:
                continue
            k = len(rows)
            obs = out_side.observe(frame.rgb, descriptor=opts.identity)
            if arc is not None and actor_arc is not None:
                face = arc.faces_for(frame.rgb, obs.face)
                if face is not None:
                    obs.arcface = arc.embedding(frame.rgb, face)
            if smirk is not None and obs.face is not None:
                smirk.add(frame.rgb, obs)
            d = cursor.at(frame.time_s + opts.start)
            dobs = None
            if d is not None:
                if last_drive is not None and last_drive[0] == d.index:
                    dobs = last_drive[1]
                else:
                    dobs = drive_side.observe(d.rgb, descriptor=opts.identity and k % DRIVER_ID_EVERY == 0)
                    if smirk is not None and dobs.face is not None:
                        smirk.add(d.rgb, dobs)
                    last_drive = (d.index, dobs)
            rows.append({"out_index": frame.index, "time": frame.time_s, "out": obs,
                         "drive_index": d.index if d is not None else -1,
                         "drive_time": d.time_s if d is not None else np.nan, "drive": dobs})
            bar.update(1)
    finally:
        bar.close()
    if smirk is not None:
        smirk.flush()
    if not rows:
        raise RetargetError(f"{inputs.output} has no frames to judge")

    ctx = dict(opts=opts, opened=opened, inputs=inputs, layout=layout, tiny=tiny, judge=judge, smirk=smirk,
               arc=arc, actor_desc=actor_desc, actor_pose=actor_pose, actor_signals=actor_signals,
               actor_arc=actor_arc)
    per_frame, metrics, moments = _metrics(rows, ctx)
    log_line = summary_line(metrics)
    if log is not None and progress:
        log(log_line)
    return EvalResult(metrics=metrics, per_frame=per_frame, moments=moments, inputs=inputs)


def _stack(rows, side: str, attr: str, shape) -> np.ndarray:
    out = np.full((len(rows),) + tuple(shape), np.nan)
    for i, r in enumerate(rows):
        obs = r[side]
        if obs is not None and obs.face is not None:
            v = getattr(obs, attr)
            if v is not None:
                out[i] = v
    return out


def _times(values: np.ndarray, limit: int = 50) -> list[float]:
    return [round(float(t), 3) for t in values[:limit]]


def _neutral_index(rows, ctx, drive_sig: np.ndarray, both: np.ndarray) -> int | None:
    """The judged pair used as neutral in relative mode (see EvalOptions.neutral_frame)."""
    if not both.any():
        return None
    opts, track = ctx["opts"], ctx["opened"].track
    drive_idx = np.array([r["drive_index"] for r in rows])
    drive_t = np.array([r["drive_time"] for r in rows], np.float64)
    candidates = np.flatnonzero(both)
    if opts.neutral_frame is not None:
        return int(candidates[np.argmin(np.abs(drive_idx[candidates] - opts.neutral_frame))])
    if track is not None:
        from retarget.motion import pick_neutral_frame

        t = track.times[pick_neutral_frame(track.params, track.valid)]
        return int(candidates[np.argmin(np.abs(drive_t[candidates] - t))])
    return int(candidates[np.argmin(drive_sig[candidates, 0])])


def _metrics(rows, ctx):
    opts, opened, inputs = ctx["opts"], ctx["opened"], ctx["inputs"]
    n = len(rows)
    t_out = np.array([r["time"] for r in rows], np.float64)
    t_drive = np.array([r["drive_time"] for r in rows], np.float64)
    matched = np.array([r["drive"] is not None for r in rows])
    out_face = np.array([r["out"].face is not None for r in rows])
    drive_face = np.array([r["drive"] is not None and r["drive"].face is not None for r in rows])
    both = out_face & drive_face

    # identity
    id_dist = np.array([distance(r["out"].descriptor, ctx["actor_desc"]) if r["out"].descriptor is not None
                        else np.nan for r in rows])
    drv_dist = np.array([distance(r["drive"].descriptor, ctx["actor_desc"])
                         if r["drive"] is not None and r["drive"].descriptor is not None else np.nan for r in rows])
    idsum = stats.summary(id_dist)
    finite = id_dist[np.isfinite(id_dist)]
    identity = {
        "judge": "dlib_resnet",
        "distance": idsum,
        "threshold": SAME_PERSON_THRESHOLD,
        "same_person_share": float((finite < SAME_PERSON_THRESHOLD).mean()) if finite.size else None,
        "driver_to_actor": stats.summary(drv_dist),
        "note": "Euclidean distance of dlib descriptors, output frame vs actor photo; lower is closer. "
                f"dlib documents < {SAME_PERSON_THRESHOLD} as the same person."
                if opts.identity else "not measured (--no-identity)",
    }
    arc_cos = np.full(n, np.nan)
    if ctx["arc"] is not None and ctx["actor_arc"] is not None:
        arc_cos = np.array([float(r["out"].arcface @ ctx["actor_arc"]) if r["out"].arcface is not None else np.nan
                            for r in rows])
        identity["arcface"] = {"judge": "arcface", "cosine": stats.summary(arc_cos),
                               "note": "the conditioning model's view (the generator was conditioned on it); "
                                       "higher is closer" + ("; TINY RANDOM WEIGHTS: meaningless" if ctx["tiny"] else "")}

    # geometry
    sig_out, sig_drv = _stack(rows, "out", "signals", (len(geo.SIGNALS),)), _stack(rows, "drive", "signals", (len(geo.SIGNALS),))
    sig_out[~both], sig_drv[~both] = np.nan, np.nan
    neutral = _neutral_index(rows, ctx, sig_drv, both) if opts.relative else None
    if opts.relative and neutral is None:
        raise RetargetError("--relative: no judged frame has a face in both clips, so there is no neutral frame")
    rel_out = sig_out - sig_out[neutral] if neutral is not None else sig_out
    rel_drv = sig_drv - sig_drv[neutral] if neutral is not None else sig_drv
    signals = {}
    step_s = float(np.median(np.diff(t_out))) if n > 1 else 0.0
    for j, name in enumerate(geo.SIGNALS):
        signals[name] = {
            "corr": stats.correlation(sig_drv[:, j], sig_out[:, j]),
            "mae": stats.mean_abs_error(rel_drv[:, j], rel_out[:, j]),
            "drive_mean": stats.nanmean(sig_drv[:, j]), "output_mean": stats.nanmean(sig_out[:, j]),
            "drive_std": _std(sig_drv[:, j]), "output_std": _std(sig_out[:, j]),
            "moves_in_drive": _moves(sig_drv[:, j], step_s),
            "actor_photo": float(ctx["actor_signals"][j]),
            "jitter_output": stats.second_difference_rms(sig_out[:, j]),
            "jitter_drive": stats.second_difference_rms(sig_drv[:, j]),
            "what": geo.SIGNAL_HELP[name],
        }
    lmd = np.full((n, 3), np.nan)
    for i, r in enumerate(rows):
        if both[i]:
            d = geo.landmark_distance(r["out"].face.lmk68, r["drive"].face.lmk68)
            lmd[i] = (d["mouth"], d["eyes"], d["all"])
    geometry = {
        "judge": "dlib_68",
        "mode": "relative" if opts.relative else "absolute",
        "neutral": None if neutral is None else {"drive_index": int(rows[neutral]["drive_index"]),
                                                  "time_s": float(t_drive[neutral])},
        "units": "inter-ocular distances",
        "signals": signals,
        "corr_mean": stats.nanmean([s["corr"] for s in signals.values() if s["moves_in_drive"] is not False]),
        "corr_mean_over": [k for k, s in signals.items() if s["moves_in_drive"] is not False],
        "mae_mean": stats.nanmean([s["mae"] for s in signals.values()]),
        "lmd": {"mouth": stats.nanmean(lmd[:, 0]), "eyes": stats.nanmean(lmd[:, 1]), "all": stats.nanmean(lmd[:, 2]),
                "units": "inter-ocular distances of the driving face, after a similarity alignment on the "
                         "nose and eye corners"},
    }

    # head pose
    pose_out, pose_drv = _stack(rows, "out", "pose", (3,)), _stack(rows, "drive", "pose", (3,))
    pose_drv_both = np.where(both[:, None], pose_drv, np.nan)
    axes = ("yaw", "pitch", "roll")

    def apd(a, b):
        d = np.abs(a - b)
        per = {ax: stats.nanmean(d[:, k]) for k, ax in enumerate(axes)}
        per["mean"] = stats.nanmean(list(per.values()))
        return per

    pose = {
        "judge": "dlib_68 + cv2.solvePnP on a generic 3-D face",
        "units": "degrees",
        "apd_vs_drive": apd(pose_out, pose_drv_both),
        "apd_vs_actor": apd(pose_out, np.broadcast_to(ctx["actor_pose"], pose_out.shape)),
        "actor_photo": {ax: float(ctx["actor_pose"][k]) for k, ax in enumerate(axes)},
        "drive_range": {ax: _range(pose_drv[:, k]) for k, ax in enumerate(axes)},
        "output_range": {ax: _range(pose_out[:, k]) for k, ax in enumerate(axes)},
    }

    # SMIRK re-tracking
    smirk_section, smirk_err = None, np.full(n, np.nan)
    smirk_out = _stack(rows, "out", "smirk", (55,))
    smirk_drv = _stack(rows, "drive", "smirk", (55,))
    target = np.full((n, 55), np.nan)
    if ctx["smirk"] is not None:
        if inputs.params is not None:
            source = "the parameters the run rendered"
            p = np.asarray(inputs.params, np.float64)
            for i, r in enumerate(rows):
                if r["out_index"] < len(p):
                    target[i] = p[r["out_index"]]
        elif opened.track is not None:
            source = f"track file {inputs.track.name} (params at the matched driving times)"
            tr = opened.track
            at = t_out + opts.start
            target = np.stack([np.interp(at, tr.times, tr.params[:, d]) for d in range(55)], axis=1)
            target[~matched] = np.nan
        else:
            source = "the driving clip re-tracked the same way (unsmoothed)"
            target = smirk_drv.copy()
            if neutral is not None:
                target = target - target[neutral] + smirk_out[neutral]
        err = np.abs(smirk_out - target)
        smirk_err = np.nanmean(np.where(np.isfinite(err), err, np.nan), axis=1) if np.isfinite(err).any() else smirk_err
        parts = {name: stats.mean_abs_error(smirk_out[:, sl], target[:, sl]) for name, sl in PARTS.items()}
        smirk_section = {
            "judge": "smirk",
            "weights": ctx["smirk"].weights_id,
            "crop_backend": ctx["smirk"].backend,
            "target": source,
            "error_55": stats.mean_abs_error(smirk_out, target),
            "error_parts": parts,
            "aed": parts["expression"],
            "corr": {name: stats.correlation(target[:, c], smirk_out[:, c]) for name, c in SMIRK_CORRELATED},
            "jitter_output": stats.second_difference_rms(smirk_out),
            "jitter_drive": stats.second_difference_rms(smirk_drv),
            "note": "mean absolute difference per coefficient; self-consistency of the generator's own tracker"
                    + ("; TINY RANDOM WEIGHTS: meaningless" if ctx["tiny"] else ""),
        }
        smirk_section["corr_mean"] = stats.nanmean(list(smirk_section["corr"].values()))
        smirk_section["jitter_ratio"] = stats.ratio(smirk_section["jitter_output"], smirk_section["jitter_drive"])

    # temporal
    fl_out, fl_drv = np.full(n, np.nan), np.full(n, np.nan)
    for i in range(1, n):
        a, b = rows[i - 1], rows[i]
        if not (both[i] and both[i - 1]) or a["drive_index"] == b["drive_index"]:
            continue
        fl_out[i] = patch_change(a["out"].patch, b["out"].patch)
        fl_drv[i] = patch_change(a["drive"].patch, b["drive"].patch)
    norm_out = np.where(both[:, None, None], _stack(rows, "out", "norm", (68, 2)), np.nan)
    norm_drv = np.where(both[:, None, None], _stack(rows, "drive", "norm", (68, 2)), np.nan)
    jit_out, jit_drv = stats.second_difference_rms(norm_out), stats.second_difference_rms(norm_drv)
    temporal = {
        "judge": "pixels of the face aligned by dlib's 5 points; dlib_68 landmarks",
        "flicker": {"output": stats.nanmean(fl_out), "drive": stats.nanmean(fl_drv),
                    "ratio": stats.ratio(stats.nanmean(fl_out), stats.nanmean(fl_drv)),
                    "units": "mean grey-level change (0..1) of the aligned 56x56 face between judged frames"},
        "jitter_landmarks": {"output": jit_out, "drive": jit_drv, "ratio": stats.ratio(jit_out, jit_drv),
                             "units": "RMS second difference of face-normalised landmarks (inter-ocular distances)"},
    }

    no_face = ~out_face
    frames = {
        "output_total": int(opened.out.frame_count), "judged": n, "every": opts.every,
        "matched": int(matched.sum()),
        "unmatched": {"count": int((~matched).sum()), "times": _times(t_out[~matched])},
        "output_no_face": {"count": int(no_face.sum()), "times": _times(t_out[no_face])},
        "drive_no_face": {"count": int((matched & ~drive_face).sum()), "times": _times(t_out[matched & ~drive_face])},
        "both_faces": int(both.sum()),
    }
    field_names = {
        "CSIM": {"value": identity["arcface"]["cosine"]["mean"] if "arcface" in identity else None,
                 "recognizer": "ArcFace (arcface.onnx, the conditioning model)" if "arcface" in identity else None,
                 "independent": {"value": idsum["mean"], "recognizer": "dlib ResNet, Euclidean distance (not a cosine)"}},
        "AED": {"value": smirk_section["aed"] if smirk_section else None, "on": "SMIRK expression coefficients"},
        "APD": {"value": pose["apd_vs_drive"]["mean"], "on": "yaw/pitch/roll from dlib 68 + solvePnP, degrees"},
        "LMD": {"value": geometry["lmd"]["all"], "mouth": geometry["lmd"]["mouth"], "eyes": geometry["lmd"]["eyes"],
                "on": "dlib 68, inter-ocular distances"},
        "flicker_ratio": {"value": temporal["flicker"]["ratio"], "on": "ours: no public portrait-animation repo has one"},
    }
    metrics = {
        "format": FORMAT, "version": VERSION,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "inputs": _fingerprints(inputs, opened),
        "settings": {"every": opts.every, "start": opts.start, "relative": opts.relative,
                     "neutral_frame": opts.neutral_frame, "redetect_every": opts.redetect_every,
                     "weights": str(ctx["layout"].root), "tiny_weights": ctx["tiny"]},
        "judges": _judges(ctx),
        "frames": frames,
        "identity": identity,
        "geometry": geometry,
        "pose": pose,
        "smirk": smirk_section,
        "temporal": temporal,
        "field_names": field_names,
    }

    per_frame = {"time_s": t_out, "drive_time_s": t_drive,
                 "out_index": np.array([r["out_index"] for r in rows]),
                 "drive_index": np.array([r["drive_index"] for r in rows]),
                 "out_face": out_face.astype(int), "drive_face": drive_face.astype(int),
                 "identity_distance": id_dist, "driver_identity_distance": drv_dist, "arcface_cosine": arc_cos,
                 "lmd_mouth": lmd[:, 0], "lmd_eyes": lmd[:, 1], "lmd_all": lmd[:, 2],
                 "flicker_output": fl_out, "flicker_drive": fl_drv, "smirk_error": smirk_err}
    for j, name in enumerate(geo.SIGNALS):
        per_frame[f"drive_{name}"], per_frame[f"out_{name}"] = sig_drv[:, j], sig_out[:, j]
    for k, ax in enumerate(axes):
        per_frame[f"drive_{ax}"], per_frame[f"out_{ax}"] = pose_drv[:, k], pose_out[:, k]
    if smirk_section:
        for name, c in SMIRK_CORRELATED[-3:] + SMIRK_CORRELATED[:3]:
            per_frame[f"target_{name}"], per_frame[f"retracked_{name}"] = target[:, c], smirk_out[:, c]
    return per_frame, metrics, _moments(rows, per_frame, no_face)


def _moves(v: np.ndarray, step_s: float) -> bool | None:
    """Whether a driving signal moves beyond its landmark noise (see MOVING_SNR); None when the
    judged frames are too far apart to tell."""
    sd, d2 = _std(v), stats.second_difference_rms(v)
    if sd is None or sd == 0:
        return False
    if step_s > MOVING_MAX_STEP_S:
        return None
    return bool(d2 is None or sd >= MOVING_SNR * d2 / np.sqrt(6.0))


def _std(v: np.ndarray) -> float | None:
    v = v[np.isfinite(v)]
    return float(v.std()) if v.size > 1 else None


def _range(v: np.ndarray) -> list | None:
    v = v[np.isfinite(v)]
    return [float(v.min()), float(v.max())] if v.size else None


def _moments(rows, pf, no_face, count: int = 3) -> list[dict]:
    """Worst and best moments by identity distance and by landmark distance, and the first frames
    without a face: the frames the report shows."""
    out = []

    def add(label, i):
        r = rows[int(i)]
        out.append({"label": label, "out_index": int(r["out_index"]),
                    "drive_index": int(r["drive_index"]) if r["drive_index"] >= 0 else None,
                    "time_s": float(r["time"])})

    for key, what in (("identity_distance", "identity"), ("lmd_all", "LMD")):
        v = pf[key]
        ok = np.flatnonzero(np.isfinite(v))
        if not ok.size:
            continue
        order = ok[np.argsort(v[ok], kind="stable")]
        for i in order[::-1][:count]:
            add(f"worst {what} {v[i]:.3f}", i)
        for i in order[:count]:
            add(f"best {what} {v[i]:.3f}", i)
    for i in np.flatnonzero(no_face)[:count]:
        add("no face", i)
    return out


def _fingerprints(inputs: EvalInputs, opened: _Opened) -> dict:
    from tracking.tracker import source_sha256

    def video(path, r):
        return {"path": str(path), "sha256": source_sha256(path), "fps": r.fps, "frames": r.frame_count,
                "size": list(r.size), "duration_s": r.duration_s}

    rec = {"output": video(inputs.output, opened.out), "drive": video(inputs.drive, opened.drive),
           "actor": {"path": str(inputs.actor), "sha256": source_sha256(inputs.actor),
                     "size": [int(opened.actor_rgb.shape[1]), int(opened.actor_rgb.shape[0])]},
           "track": None, "params": None}
    if inputs.track is not None:
        rec["track"] = {"path": str(inputs.track), "sha256": source_sha256(inputs.track),
                        "weights_id": opened.track.weights_id}
    if inputs.params is not None:
        import hashlib

        rec["params"] = {"rows": int(len(inputs.params)),
                         "sha256": hashlib.sha256(np.ascontiguousarray(inputs.params, np.float32).tobytes()).hexdigest()}
    return rec


def _judges(ctx) -> dict:
    from tracking.smirk import file_sha256
    from retarget.evaluate.judges import descriptor_path
    from tracking.faces import dlib_predictor_path

    rec = {
        "dlib_resnet": {"file": descriptor_path().name, "sha256": file_sha256(descriptor_path())[:16],
                        "package": "face-recognition-models", "independent": True,
                        "what": "128-d face descriptor; same person under 0.6 (dlib's documented threshold)"},
        "dlib_68": {"file": dlib_predictor_path().name, "sha256": file_sha256(dlib_predictor_path())[:16],
                    "package": "face-recognition-models", "independent": True,
                    "what": "HOG face detector + 68-point landmarks"},
        "smirk": None, "arcface": None,
    }
    if ctx["smirk"] is not None:
        rec["smirk"] = {"weights": ctx["smirk"].weights_id, "independent": False, "tiny": ctx["tiny"],
                        "what": "the tracker that produced the driving parameters"}
    if ctx["arc"] is not None:
        rec["arcface"] = {"file": ctx["arc"].path.name, "sha256": file_sha256(ctx["arc"].path)[:16],
                          "independent": False, "tiny": ctx["tiny"],
                          "what": "the identity model the generator is conditioned on"}
    return rec


# --------------------------------------------------------------------------- summaries and files

def _f(v, spec=".3f") -> str:
    return "n/a" if v is None else format(v, spec)


def summary_line(m: dict) -> str:
    """One line: identity distance, geometry correlation, APD, flicker ratio."""
    ident = m["identity"]
    return (f"eval: identity distance {_f(ident['distance']['mean'])} (dlib; same person < {ident['threshold']}), "
            f"geometry corr {_f(m['geometry']['corr_mean'])}, APD {_f(m['pose']['apd_vs_drive']['mean'], '.1f')} deg, "
            f"flicker ratio {_f(m['temporal']['flicker']['ratio'], '.2f')}")


def summary_text(m: dict) -> str:
    """The one-screen terminal summary of a metrics record."""
    fr, ident, g, p, t, s = m["frames"], m["identity"], m["geometry"], m["pose"], m["temporal"], m["smirk"]
    d = ident["distance"]
    lines = [
        f"judged {fr['judged']} of {fr['output_total']} output frames (every {fr['every']}); "
        f"matched in time {fr['matched']}, both faces {fr['both_faces']}",
    ]
    if fr["output_no_face"]["count"]:
        lines.append(f"  output frames without a face: {fr['output_no_face']['count']} "
                     f"(at {', '.join(f'{x:.2f}s' for x in fr['output_no_face']['times'][:8])}"
                     f"{' ...' if fr['output_no_face']['count'] > 8 else ''})")
    if fr["unmatched"]["count"]:
        lines.append(f"  output frames outside the driving clip's time range: {fr['unmatched']['count']}")
    share = ident["same_person_share"]
    lines += [
        "identity (dlib ResNet distance to the actor photo; lower is closer)",
        f"  mean {_f(d['mean'])}  p5 {_f(d['p5'])}  p95 {_f(d['p95'])}  "
        f"under {ident['threshold']}: {_f(None if share is None else 100 * share, '.0f')}% of frames  "
        f"(driver vs actor: {_f(ident['driver_to_actor']['mean'])})",
    ]
    if "arcface" in ident:
        lines.append(f"  ArcFace cosine (conditioning model's view) mean {_f(ident['arcface']['cosine']['mean'])}")
    lines.append(f"expression geometry (dlib 68, {g['mode']}; corr 1 = follows, MAE in inter-ocular distances)")
    for name, sig in g["signals"].items():
        still = "  (still in the driving clip: corr is noise)" if sig["moves_in_drive"] is False else ""
        lines.append(f"  {name:<12} corr {_f(sig['corr'], '6.3f')}  MAE {_f(sig['mae'], '.4f')}  "
                     f"driving std {_f(sig['drive_std'], '.3f')}{still}")
    unsure = all(sig["moves_in_drive"] is None for sig in g["signals"].values())
    lines.append(f"  corr mean {_f(g['corr_mean'])} over "
                 + ("all signals (judged frames too far apart to tell which move)" if unsure
                    else "the signals that move in the driving clip"))
    lines.append(f"  LMD mouth {_f(g['lmd']['mouth'], '.4f')}  eyes {_f(g['lmd']['eyes'], '.4f')}  "
                 f"all {_f(g['lmd']['all'], '.4f')}")
    if s is not None:
        lines.append(f"SMIRK re-tracking ({s['weights']}{', tiny: meaningless' if m['settings']['tiny_weights'] else ''})")
        lines.append(f"  AED {_f(s['aed'], '.4f')}  error 55-d {_f(s['error_55'], '.4f')}  eyelids "
                     f"{_f(s['error_parts']['eyelids'], '.4f')}  jaw {_f(s['error_parts']['jaw'], '.4f')}  "
                     f"corr mean {_f(s['corr_mean'])}")
    a = p["apd_vs_drive"]
    lines.append(f"head pose APD vs driving {_f(a['mean'], '.1f')} deg (yaw {_f(a['yaw'], '.1f')}, pitch "
                 f"{_f(a['pitch'], '.1f')}, roll {_f(a['roll'], '.1f')}); vs actor photo "
                 f"{_f(p['apd_vs_actor']['mean'], '.1f')} deg")
    lines.append(f"temporal: flicker ratio {_f(t['flicker']['ratio'], '.2f')} (1 = as steady as the driving clip), "
                 f"landmark jitter ratio {_f(t['jitter_landmarks']['ratio'], '.2f')}")
    return "\n".join(lines)


def _jsonable(o):
    if isinstance(o, dict):
        return {k: _jsonable(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [_jsonable(v) for v in o]
    if isinstance(o, (np.floating, float)):
        return None if not np.isfinite(o) else float(o)
    if isinstance(o, np.integer):
        return int(o)
    if isinstance(o, np.bool_):
        return bool(o)
    return o


def metrics_json(m: dict) -> str:
    """The metrics record as JSON text (NaN written as null)."""
    return json.dumps(_jsonable(m), indent=1, allow_nan=False)


def grab_moments(result: EvalResult) -> None:
    """Decode the frames of `result.moments` (a second pass over both videos, stopping when all
    are found) into `result.frames`."""
    from render.video import open_video

    want_out = {m["out_index"] for m in result.moments}
    want_drv = {m["drive_index"] for m in result.moments if m["drive_index"] is not None}
    got_out, got_drv = {}, {}
    for path, want, got in ((result.inputs.output, want_out, got_out), (result.inputs.drive, want_drv, got_drv)):
        if not want:
            continue
        for frame in open_video(path).frames():
            if frame.index in want:
                got[frame.index] = frame.rgb
                if len(got) == len(want):
                    break
    result.frames = [(m["label"] + f" @{m['time_s']:.2f}s", got_drv.get(m["drive_index"]), got_out.get(m["out_index"]))
                     for m in result.moments if m["out_index"] in got_out]


def write_outputs(result: EvalResult, folder: str | os.PathLike) -> dict[str, Path]:
    """Write `metrics.json`, `per_frame.csv`, `report.html` and `plots/*.png` into `folder`
    (created), each atomically. Returns {name: path}."""
    from render.files import atomic_open
    from render.report import write_report

    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise RetargetError(f"-o {folder}: cannot create the report folder ({e.strerror})") from None
    paths = {"metrics": folder / "metrics.json", "per_frame": folder / "per_frame.csv"}
    with atomic_open(paths["metrics"], "w") as f:
        f.write(metrics_json(result.metrics) + "\n")
    names = list(result.per_frame)
    with atomic_open(paths["per_frame"], "w") as f:
        f.write(",".join(names) + "\n")
        for i in range(len(result.per_frame["time_s"])):
            f.write(",".join("" if not np.isfinite(float(result.per_frame[k][i])) else f"{float(result.per_frame[k][i]):.6g}"
                             for k in names) + "\n")
    if not result.frames and result.moments:
        grab_moments(result)
    paths.update(write_report(folder, _jsonable(result.metrics), result.per_frame, result.frames,
                              summary=summary_text(result.metrics)))
    return paths
