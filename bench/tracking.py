"""Speed of `retarget track` per stage, and the quality of the temporal smoothing.

    python bench/tracking.py --device cpu                 # this machine's CPU
    python bench/tracking.py --device cuda --frames 1500  # a GPU machine
    python bench/tracking.py --tiny                       # seconds-long smoke run

Input: a synthetic clip made on the fly from skimage's astronaut (a real face) drifting,
turning and zooming, `--size` pixels square, H.264. Stages, each in frames/s:
- decode: PyAV decode + conversion to RGB (render.video.open_video);
- detect: the face backend in use (faces + landmarks), one process; and decode+detect with
  detection spread over worker processes (the tracker's `detect_workers`);
- crop: the SMIRK similarity crop (224x224);
- encode: the SMIRK expression encoder, full architecture with random weights (the
  arithmetic does not depend on the values), batch 64 on GPU (fp32 and fp16) or 8 on CPU,
  host-to-device copy included;
- track_everyN: the tracker's face finding with full detection every N frames and the face
  re-found near its last landmarks in between, one process;
- whole: `track_video` end to end (decode, detect, follow, crop, encode, fill, smooth),
  model loading and worker start-up included; "old" detects on every frame and decodes in
  the main thread, "new" uses the defaults (detection every 10 frames, decode thread);
- decode_threads: PyAV decode + RGB conversion with ffmpeg's thread count auto or fixed.
`--transport`: instead of the per-stage runs, how frames reach the workers: decode +
detect_stream with a backend that finds nothing (decoding and hand-over only) and with the
real one at several worker counts, with the main thread's waits; then the whole tracker as
before 2026-11-24's changes (frames pickled to all-but-one cores' workers, swscale RGB),
after each change, and with the defaults, alternated three times.
Smoothing: jitter reduction (still stretches) and lag (cross-correlation) of the default
zero-phase and One Euro filters on synthetic hold-and-move curves with Gaussian noise.

Writes bench/results/tracking_<device>_<date>.json (or --out-dir) and prints a table.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import functools
import json
import os
import platform
import sys
import tempfile
import time
from fractions import Fraction
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tracking import smoothing as sm  # noqa: E402
from tracking.faces import DlibBackend, Face  # noqa: E402


# -- input ------------------------------------------------------------------------------------

def make_clip(path: Path, n: int, size: int, fps: int = 25) -> Path:
    """n frames, size x size, of the astronaut's face moving (face ~35% of the frame)."""
    import av
    import cv2
    from skimage import data

    img = data.astronaut()
    centre = np.array([223.0, 127.0])  # the face centre in astronaut.png
    c = av.open(str(path), "w")
    s = c.add_stream("libx264", rate=fps)
    s.width = s.height = size
    s.pix_fmt = "yuv420p"
    s.options = {"crf": "18", "preset": "veryfast"}
    for i in range(n):
        angle = 8.0 * np.sin(i / 17)
        scale = (size / 512) * 1.6 * (1 + 0.08 * np.sin(i / 23))
        A = cv2.getRotationMatrix2D(tuple(centre), angle, scale)
        A[:, 2] += np.array([size / 2 + 0.05 * size * np.sin(i / 11), size / 2 + 0.03 * size * np.cos(i / 13)]) - centre
        rgb = cv2.warpAffine(img, A, (size, size), borderMode=cv2.BORDER_REFLECT)
        f = av.VideoFrame.from_ndarray(rgb, format="rgb24")
        f.pts, f.time_base = i, Fraction(1, fps)
        for p in s.encode(f):
            c.mux(p)
    for p in s.encode():
        c.mux(p)
    c.close()
    return path


# -- a stand-in landmark model where the 68-point one cannot be brought ----------------------

class FivePointDlib(DlibBackend):
    """dlib HOG detection and tracking (exactly DlibBackend's) + dlib's 5-point landmark model.

    Only a timing stand-in for machines where the 100 MB 68-point model cannot be carried:
    same detector, a cheaper landmark step; its crops come from 5 points, not the real ones.
    """

    name = "dlib-hog+5pt (timing stand-in)"

    def __init__(self, predictor_path: str):
        super().__init__()
        import dlib

        self._own_models = (dlib, dlib.get_frontal_face_detector(), dlib.shape_predictor(predictor_path))

    def _models(self):
        return self._own_models

    def _face(self, bbox, score, points):
        # dlib's 5 points: eye corners (2 + 2) and the nose base; enough for a crop box.
        pts = points
        kps5 = np.stack([pts[2:4].mean(0), pts[0:2].mean(0), pts[4], pts[4], pts[4]]).astype(np.float32)
        return Face(bbox=bbox, score=score, kps5=kps5, lmk68=None, landmarks=pts)


def choose_backend(five_point: str | None):
    """(factory, description): the real tracking backend when its model is here, else the
    5-point stand-in (when given), else None."""
    from tracking.faces import dlib_predictor_path
    from tracking.tracker import default_backend_factory

    try:
        dlib_predictor_path()
        return default_backend_factory(None), "dlib (HOG + 68 landmarks), the offline tracking backend"
    except Exception as e:  # RetargetError: model package missing
        reason = str(e)
    if five_point and Path(five_point).is_file():
        return (functools.partial(FivePointDlib, five_point),
                f"dlib HOG + 5-point landmarks, a timing stand-in ({reason})")
    return None, reason


# -- stages -------------------------------------------------------------------------------------

def timed(fn, *args, **kwargs):
    t = time.perf_counter()
    out = fn(*args, **kwargs)
    return out, time.perf_counter() - t


def swscale_rgb(frame) -> np.ndarray:
    """Decoding as before 2026-11-24: every frame through swscale's rgb24 path."""
    return frame.to_ndarray(format="rgb24")


@contextlib.contextmanager
def tracker_as(opencv_yuv: bool = True, share_frames: bool = True):
    """Inside: decoding converts with OpenCV (or swscale, as before) and frames reach the
    workers through shared memory (or pickled, as before); the defaults are restored after."""
    from render import video
    from tracking import tracker

    fast_rgb = video.frame_to_rgb
    tracker.SHARE_FRAMES, video.frame_to_rgb = share_frames, (fast_rgb if opencv_yuv else swscale_rgb)
    try:
        yield
    finally:
        tracker.SHARE_FRAMES, video.frame_to_rgb = True, fast_rgb


def bench_decode(clip: Path, opencv_yuv: bool = True) -> dict:
    from render.video import open_video

    with tracker_as(opencv_yuv):
        n, secs = timed(lambda: sum(1 for _ in open_video(clip)))
    return {"frames": n, "seconds": secs, "fps": n / secs, "opencv_yuv": opencv_yuv}


def bench_detect(frames: list, factory) -> tuple[dict, list]:
    backend = factory()
    backend.detect(frames[0].rgb)  # model load and first-call costs out of the timing
    faces, secs = timed(lambda: [backend.detect(f.rgb) for f in frames])
    found = sum(1 for f in faces if f)
    return {"frames": len(frames), "seconds": secs, "fps": len(frames) / secs, "with_face": found}, faces


def bench_detect_parallel(clip: Path, factory, workers: int, n: int) -> dict:
    from render.video import open_video
    from tracking.tracker import detect_stream

    backend = None  # detection happens in the workers only

    def run(k):
        return sum(1 for _ in detect_stream(open_video(clip).frames(max_frames=k), backend, workers=workers,
                                            factory=factory))

    _, startup = timed(run, 1)  # pool start + model load per worker
    count, secs = timed(run, n)
    return {"workers": workers, "frames": count, "seconds": secs, "startup_s": startup,
            "fps": count / secs, "fps_after_startup": count / max(secs - startup, 1e-9)}


class NullBackend:
    """Finds no face, instantly: detect_stream with it measures decoding and handing frames
    to the workers, nothing else."""

    name = "null"

    def detect(self, image_rgb, timestamp_ms=None):
        return []


def bench_stream(clip: Path, factory, workers: int, n: int, decode_ahead: int) -> dict:
    """decode (thread when decode_ahead > 0) + detect_stream over `workers` processes, with
    the main thread's waits: for decoded frames, handing chunks over, for the workers."""
    from render.video import open_video, prefetch
    from tracking.tracker import TrackOptions, detect_stream

    stats: dict = {}

    def run(k):
        frames = open_video(clip).frames(max_frames=k)
        if decode_ahead:
            frames = prefetch(frames, decode_ahead)
        return sum(1 for _ in detect_stream(frames, None, workers=workers, factory=factory,
                                            redetect_every=TrackOptions.redetect_every, stats=stats))

    _, startup = timed(run, 1)
    count, secs = timed(run, n)
    return {"workers": workers, "decode_ahead": decode_ahead, "frames": count, "seconds": secs,
            "startup_s": startup, "fps": count / secs, "fps_after_startup": count / max(secs - startup, 1e-9),
            **{k: round(v, 3) for k, v in stats.items()}}


def bench_crop(frames: list, faces: list) -> dict:
    from tracking.tracker import encoder_crop

    pairs = [(f.rgb, fl[0]) for f, fl in zip(frames, faces) if fl]
    _, secs = timed(lambda: [encoder_crop(rgb, face) for rgb, face in pairs])
    return {"crops": len(pairs), "seconds": secs, "fps": len(pairs) / max(secs, 1e-9)}


def bench_encode(device: str, batch: int, n_batches: int, half: bool) -> dict:
    import torch

    from tracking.smirk import ExpressionEncoder

    torch.manual_seed(0)
    dtype = torch.float16 if half else torch.float32
    model = ExpressionEncoder().to(device=device, dtype=dtype).eval()
    crops = np.random.default_rng(0).integers(0, 256, (batch, 224, 224, 3), dtype=np.uint8)
    for _ in range(3):
        model.encode(crops)
    if device == "cuda":
        torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(n_batches):
        model.encode(crops)  # returns numpy: synchronises with the GPU
    secs = time.perf_counter() - t
    return {"batch": batch, "dtype": str(dtype).replace("torch.", ""), "images": batch * n_batches,
            "seconds": secs, "fps": batch * n_batches / secs}


def bench_whole(clip: Path, ckpt: Path, factory, device: str, workers: int, max_frames: int,
                redetect_every: int, decode_ahead: int, share_frames: bool = True,
                opencv_yuv: bool = True) -> dict:
    """track_video end to end. share_frames=False pickles the frames to the workers and
    opencv_yuv=False converts them with swscale: the tracker as it was before each change."""
    from tracking.tracker import TrackOptions, _auto_workers, track_video

    opts = TrackOptions(device=device, detect_workers=workers, max_frames=max_frames,
                        redetect_every=redetect_every, decode_ahead=decode_ahead)
    with tracker_as(opencv_yuv, share_frames):
        track, secs = timed(track_video, clip, smirk_path=ckpt, options=opts, progress=False,
                            backend_factory=factory)
    return {"workers": _auto_workers(workers, max_frames), "redetect_every": redetect_every,
            "decode_ahead": decode_ahead, "share_frames": share_frames, "opencv_yuv": opencv_yuv, "frames": len(track),
            "valid": int(track.valid.sum()), "seconds": secs, "fps": len(track) / secs}


def bench_tracker(frames: list, factory, redetect_every: int) -> dict:
    """FaceTracker (detection every N frames, tracking between) in one process."""
    from tracking.tracker import FaceTracker

    backend = factory()
    backend.detect(frames[0].rgb)
    tracker = FaceTracker(backend, redetect_every)
    _, secs = timed(lambda: [tracker(f.rgb, f.index) for f in frames])
    return {"redetect_every": redetect_every, "frames": len(frames), "detections": tracker.detections,
            "seconds": secs, "fps": len(frames) / secs}


def bench_decode_threads(clip: Path, n: int) -> dict:
    """PyAV decode + swscale rgb24 conversion of n frames with ffmpeg's thread count 0 (auto)
    or fixed."""
    import av

    out = {}
    for count in (0, 1, 2, 4, 8):
        def run():
            with av.open(str(clip)) as c:
                s = c.streams.video[0]
                s.thread_type = "AUTO"
                s.codec_context.thread_count = count
                k = 0
                for fr in c.decode(s):
                    fr.to_ndarray(format="rgb24")
                    k += 1
                    if k >= n:
                        break
                return k
        k, secs = timed(run)
        out[f"threads_{count or 'auto'}_fps"] = k / secs
    return out


def bench_landmark_models() -> dict:
    """ms per face of dlib's 68-point and 5-point landmark models (where both are here)."""
    import dlib
    from skimage import data

    from tracking.faces import DlibBackend, dlib_predictor_path

    img = np.ascontiguousarray(data.astronaut())
    face = DlibBackend().detect(img)[0]
    rect = dlib.rectangle(*[int(round(v)) for v in face.bbox[:2]], *[int(round(v)) - 1 for v in face.bbox[2:]])
    out = {}
    p68 = dlib_predictor_path()
    for name, path in (("68", p68), ("5", p68.parent / "shape_predictor_5_face_landmarks.dat")):
        if path.is_file():
            pred = dlib.shape_predictor(str(path))
            pred(img, rect)
            _, secs = timed(lambda: [pred(img, rect) for _ in range(200)])
            out[f"landmarks_{name}pt_ms"] = secs / 200 * 1000
    return out


# -- smoothing quality ---------------------------------------------------------------------------

def smoothing_table(seconds: int = 30) -> list[dict]:
    rows = []
    for fps in (25, 30):
        for noise in (0.02, 0.05, 0.1):
            t, clean, still = sm.synthetic_motion(fps * seconds, fps, dims=8, seed=0)
            noisy = clean + noise * np.random.default_rng(100).standard_normal(clean.shape)
            margin = int(0.3 * fps)
            j0 = sm.still_jitter(noisy, still, margin)
            for method in ("zero_phase", "one_euro"):
                out = sm.smooth(noisy, t, method)
                red = j0 / sm.still_jitter(out, still, margin)
                lag = sm.lag_frames(out, clean)
                ok = red >= 5 and (abs(lag) < 0.5 if method == "zero_phase" else lag <= 1.0)
                rows.append({"fps": fps, "noise_sd": noise, "method": method, "jitter_reduction": red,
                             "lag_frames": lag, "rmse_vs_clean": float(np.sqrt(np.mean((out - clean) ** 2))),
                             "rmse_input": float(np.sqrt(np.mean((noisy - clean) ** 2))), "meets_goal": bool(ok)})
    return rows


# -- main -----------------------------------------------------------------------------------------

def environment(device: str) -> dict:
    import av
    import timm
    import torch

    env = {"date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), "device": device,
           "python": platform.python_version(), "torch": torch.__version__, "timm": timm.__version__,
           "av": av.__version__, "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
           "cpu": platform.processor() or platform.machine()}
    try:
        import dlib
        env["dlib"] = dlib.__version__
    except ImportError:
        pass
    if hasattr(os, "getloadavg"):
        env["load_avg_at_start"] = os.getloadavg()[0]
    if device == "cuda":
        env["gpu"] = torch.cuda.get_device_name(0)
    return env


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    ap.add_argument("--frames", type=int, default=None, help="clip length (default 300 cpu, 1500 cuda)")
    ap.add_argument("--size", type=int, default=512, help="frame side in pixels")
    ap.add_argument("--workers", type=int, default=-1, help="detection processes for the per-stage runs (-1: the tracker's automatic count, at least 1)")
    ap.add_argument("--five-point", default=None, help="dlib 5-point model, a stand-in where the 68-point one is missing")
    ap.add_argument("--transport", action="store_true",
                    help="instead of the per-stage runs: decode + hand-over to the workers, worker counts, and "
                         "the whole tracker before and after each of 2026-11-24's changes")
    ap.add_argument("--tiny", action="store_true", help="smoke run: 24 frames of 256 px, few batches")
    ap.add_argument("--out-dir", default=str(Path(__file__).resolve().parent / "results"))
    args = ap.parse_args()

    import torch

    device = args.device
    if device == "cuda" and not torch.cuda.is_available():
        sys.exit("--device cuda: no CUDA GPU visible")
    n = args.frames or (24 if args.tiny else (1500 if device == "cuda" else 300))
    size = 256 if args.tiny else args.size
    # Measure the parallel path even where `track` would not pick it (2 cores), to show why.
    from tracking.tracker import _auto_workers

    workers = args.workers if args.workers >= 0 else max(1, _auto_workers(-1))
    env = environment(device)
    result = {"environment": env, "config": {"frames": n, "size": size, "workers": workers, "tiny": args.tiny}}

    factory, backend_desc = choose_backend(args.five_point)
    result["backend"] = backend_desc
    print(f"face backend: {backend_desc}")
    tmp = Path(tempfile.mkdtemp(prefix="bench-tracking-"))
    clip, secs = timed(make_clip, tmp / "clip.mp4", n, size)
    print(f"clip: {n} frames {size}x{size} made in {secs:.1f}s")

    from render.video import open_video
    from tracking.smirk import CHECKPOINT_PREFIX, ExpressionEncoder
    from tracking.tracker import TrackOptions

    stages = {"decode": bench_decode(clip), "decode_swscale": bench_decode(clip, opencv_yuv=False)}
    result["decode_threads"] = bench_decode_threads(clip, min(n, 500))
    encode_batch = 64 if device == "cuda" else 8
    n_batches = 2 if args.tiny else (20 if device == "cuda" else 8)
    stages["encode_fp32"] = bench_encode(device, encode_batch, n_batches, half=False)
    if device == "cuda":
        stages["encode_fp16"] = bench_encode(device, encode_batch, n_batches, half=True)
    if factory is not None and args.transport:
        torch.manual_seed(0)
        ckpt = tmp / "SMIRK_random.pt"
        torch.save({CHECKPOINT_PREFIX + k2: v for k2, v in ExpressionEncoder().state_dict().items()}, ckpt)
        every, ahead = TrackOptions.redetect_every, TrackOptions.decode_ahead
        stream = {f"null_{workers}w": bench_stream(clip, functools.partial(NullBackend), workers, n, ahead)}
        for w in sorted({4, 8, workers}):
            stream[f"faces_{w}w"] = bench_stream(clip, factory, w, n, ahead)
        for name, r in stream.items():
            stages[f"stream_{name}"] = r
        # (tag, workers, shared memory, OpenCV yuv): as before (the old automatic worker count,
        # all cores but one), each change in turn, and the defaults (half the cores).
        old_auto = max(1, (os.cpu_count() or 2) - 1)
        variants = [("before", old_auto, False, False), ("shared", old_auto, True, False),
                    ("shared_cv", old_auto, True, True), ("default", -1, True, True)]
        # Alternate the variants, three times each, so that drift on the machine hits all alike.
        for rep in (1, 2, 3):
            for tag, w, share, cv in variants:
                stages[f"whole_{tag}_{rep}"] = bench_whole(clip, ckpt, factory, device, w, n, every, ahead,
                                                           share, cv)
    elif factory is not None:
        k = min(n, 24 if args.tiny else 100)
        frames = list(open_video(clip).frames(max_frames=k))
        stages["detect"], faces = bench_detect(frames, factory)
        for every in (10, 25):
            stages[f"track_every{every}"] = bench_tracker(frames, factory, every)
        stages["crop"] = bench_crop(frames, faces)
        del frames
        if workers > 0:
            stages["decode_detect_parallel"] = bench_detect_parallel(clip, factory, workers, n)
        torch.manual_seed(0)
        ckpt = tmp / "SMIRK_random.pt"
        torch.save({CHECKPOINT_PREFIX + k2: v for k2, v in ExpressionEncoder().state_dict().items()}, ckpt)
        seq_frames = min(n, 24 if args.tiny else (200 if device == "cuda" else n))
        # old: detection on every frame, decoding in the main thread; new: the defaults.
        for tag, every, ahead in (("old", 1, 0), ("new", TrackOptions.redetect_every, TrackOptions.decode_ahead)):
            stages[f"whole_sequential_{tag}"] = bench_whole(clip, ckpt, factory, device, 0, seq_frames, every, ahead)
            if workers > 0:
                stages[f"whole_parallel_{tag}"] = bench_whole(clip, ckpt, factory, device, workers, n, every, ahead)
    try:
        result["landmark_models"] = bench_landmark_models()
    except Exception as e:  # the 68-point model is not on every machine
        result["landmark_models"] = {"error": str(e)}
    result["stages"] = stages
    result["smoothing"] = smoothing_table(10 if args.tiny else 30)

    print(f"\n{'stage':<24}{'frames/s':>10}  detail")
    for name, r in stages.items():
        detail = ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in r.items() if k != "fps")
        print(f"{name:<24}{r['fps']:>10.1f}  {detail}")
    print("decode threads (frames/s): " + ", ".join(f"{k}={v:.0f}" for k, v in result["decode_threads"].items()))
    if "error" not in result["landmark_models"]:
        print("landmark models (ms/face): " + ", ".join(f"{k}={v:.2f}" for k, v in result["landmark_models"].items()))
    print(f"\n{'fps':>4} {'noise':>6} {'method':<11}{'jitter /':>9}{'lag (fr)':>10}{'rmse':>8}{'input':>8}  goal")
    for r in result["smoothing"]:
        print(f"{r['fps']:>4} {r['noise_sd']:>6.2f} {r['method']:<11}{r['jitter_reduction']:>8.1f}x"
              f"{r['lag_frames']:>10.2f}{r['rmse_vs_clean']:>8.3f}{r['rmse_input']:>8.3f}  "
              f"{'met' if r['meets_goal'] else 'MISSED'}")

    if hasattr(os, "getloadavg"):
        env["load_avg_at_end"] = os.getloadavg()[0]  # other work on the machine skews CPU timings
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tag = ("tiny" if args.tiny else device) + ("_transport" if args.transport else "")
    out = out_dir / f"tracking_{tag}_{dt.date.today().isoformat()}.json"
    out.write_text(json.dumps(result, indent=2))
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
