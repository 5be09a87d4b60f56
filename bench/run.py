"""The whole `retarget run` job on the GPU at full size, next to the pipeline's own rate in the same run.

    python bench/run.py                          # GPU: fast mode 1,000 frames, quality mode 300 (~6-8 min)
    python bench/run.py --memory-gb 24           # the same under a 24 GiB per-process cap (a 24 GB card)
    python bench/run.py --modes fast --frames 1000 --deadline 500
    python bench/run.py --tiny                   # CPU smoke run: tiny weights, a short small clip (~1 min)
    python bench/run.py --ahead on,off           # each mode rendering while tracking, and after (serial)
    python bench/run.py --early-write on,off     # the video written while tracking (retarget.run.EARLY_WRITE), or after
    python bench/run.py --writer process,thread  # paste-back + encode in a process of their own, or in the job's threads

Inputs, made by the bench: a 1920x1080 driving clip at 25 fps with audio (the sample driving
performance of retarget/samples.py, 1080 px square, drifting slowly across a 1080p canvas:
a real face that a detector finds, with head motion and a mouth opening), and a 1920x1080 actor
photo (the sample actor scaled to 1080 px in a 1080p canvas). Weights: full-size random weights
in the real architectures (bench/scale.py `write_full_weights`: SD 1.5 UNet and VAE, CLIP-L,
adapters and LoRAs at the release's sizes; the tiny set's SMIRK, which is already the real
tf_mobilenetv3_large_minimal_100 + linear 960->55 encoder, and its ArcFace/tokenizer).

Faces: bench/standin_faces.py (dlib's real HOG detector + dlib's real 5-point model, the 68 points
from a mean shape: a stand-in for landmark *positions*), installed in this process and in the
tracker's face-finding worker processes; the 68-point model (100 MB) cannot travel to the GPU host.
`--faces dlib` uses the real 68-point backend where it is installed.

Per mode (fast: LCM-LoRA 4 steps; quality: DPM++ 25 steps, CFG 3.0, reference bank), with the
models loaded once before the timed jobs (the next job of `retarget batch` or the app; the load
time is reported apart):
- the whole job, `retarget.run.run` (decode, track, prepare the actor, render into the work
  folder, paste back, encode H.264 with the driving clip's audio), its stage times (from
  `RunSummary.stages` when the run reports them, else timed here from outside: tracking
  (tracking.tracker.track_video), prepare, render (first batch asked to last frame saved) and the
  rest: paste-back + encode + audio after the last frame), frames/s, the batch it chose, and the
  peak GPU memory (allocated and reserved by PyTorch; the CUDA context, ~0.5 GB, comes on top);
- the pipeline's own rate: the loaded pipeline called directly on the same expressions in the
  same batches, steps and mode (warmed up first, as the job's first batch is not);
- the headline: whole-job frames/s / pipeline frames/s (goal >= 90%).
`--oom-check` (GPU, default on): one more short fast-mode job with the automatic batch in which, after the
first batch, a ballast tensor takes the memory so that a full batch no longer fits: a real
out-of-memory mid-run; the job must halve the batch (retarget.oom.split_on_oom) and finish.

Writes bench/results/run_<gpu>_<date>.json (GPU, versions, date, CPU count, memory cap, rows).
The device call is limited to 10 minutes: 1,000 quality-mode frames alone are ~200 s at ~5
frames/s and the pipeline-rate pass as many again, hence the defaults (fast 1,000, quality 300)
and `--deadline` (seconds; a mode whose estimate does not fit in what is left is skipped and
said so).

Files that must travel to the GPU host beside the repository (64 MiB a call): the wheel of
dlib-bin (dlib_bin-20.0.1.post1-cp312-cp312-manylinux_2_27_x86_64.manylinux_2_28_x86_64.whl,
4.2 MB) unless dlib is
installed there, and shape_predictor_5_face_landmarks.dat (9.2 MB, face-recognition-models'
models folder), given by `--predictor-5 PATH` or $RETARGET_STANDIN_5PT.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime as dt
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

FPS = 25.0
MODES = ("fast", "quality")
DEFAULT_FRAMES = {"fast": 1000, "quality": 300}
# Seconds per frame on an H200 for --deadline's estimate: the whole job (measured 2026-12-03: 0.035
# fast, 0.19 quality) and the pipeline pass of 160 frames spread over the mode's default clip, with room.
GPU_SECONDS_PER_FRAME = {"fast": 0.045, "quality": 0.30}


# -- inputs ---------------------------------------------------------------------------------------

def canvas_frames(frames: int, width: int, height: int, fps: float = FPS):
    """Yield `frames` HxWx3 uint8 frames: the sample driving performance (retarget/samples.py),
    `height` px square, drifting slowly left and right across a `width` x `height` grey canvas."""
    from retarget.samples import sample_driving_frames

    side = height
    for k, (t, face) in enumerate(sample_driving_frames(frames / fps, fps, size=side)):
        canvas = np.full((height, width, 3), 96, np.uint8)
        x = int(round((width - side) / 2 + 0.25 * (width - side) * np.sin(2 * np.pi * t / 8.0)))
        canvas[:, x:x + side] = face
        yield canvas


def make_inputs(root: Path, frames: int, width: int, height: int) -> tuple[Path, Path]:
    """drive.mp4 (H.264 + AAC tone, `frames` frames at 25 fps, width x height) and actor.png (the
    sample actor scaled to `height` px in a width x height canvas)."""
    import cv2

    from render.storyboard import save_image
    from render.video import VideoWriter
    from retarget.samples import sample_actor, write_tone

    root.mkdir(parents=True, exist_ok=True)
    drive, actor = root / "drive.mp4", root / "actor.png"
    wav = root / "tone.wav"
    write_tone(wav, frames / FPS)
    with VideoWriter(drive, FPS, audio_from=wav) as writer:
        for rgb in canvas_frames(frames, width, height):
            writer.write(rgb)
    wav.unlink()
    face = cv2.resize(sample_actor(), (height, height), interpolation=cv2.INTER_CUBIC)
    photo = np.full((height, width, 3), 128, np.uint8)
    x = (width - height) // 2
    photo[:, x:x + height] = face
    save_image(actor, photo)
    return drive, actor


# -- timing from outside the job ------------------------------------------------------------------

class StageClock:
    """Stage times of one job measured around it: tracking (track_video), prepare (the prepare=
    hook), render (first batch asked to last frame handed back), and the Rendering it made."""

    def __init__(self):
        self.t = {}
        self.rendering = None
        self.batch_sizes: list[int] = []

    def prepare_hook(self, pipe, wrap_render: bool):
        from retarget.run import prepare_rendering

        def hook(*a, **kw):
            t0 = time.perf_counter()
            r = prepare_rendering(*a, pipe=pipe, **kw)
            self.t["prepare"] = time.perf_counter() - t0
            self.rendering = r
            if wrap_render:
                inner = dataclasses.replace(r).render  # the local path: _render_with_backoff -> split_on_oom

                def render_batches(batches, params):
                    t1 = time.perf_counter()
                    self.batch_sizes = [len(b) for b in batches]
                    for idx, images in inner(batches, params):
                        yield idx, images
                    self.t["render"] = time.perf_counter() - t1
                    self.t["render_end"] = time.perf_counter()

                r.render_batches = render_batches
            return r

        return hook

    @staticmethod
    def tracking(stats: dict):
        """A context in which tracking.tracker.track_video records its seconds in stats['track']."""
        import contextlib

        from tracking import tracker

        @contextlib.contextmanager
        def ctx():
            real = tracker.track_video

            def timed(*a, **kw):
                t0 = time.perf_counter()
                stats.setdefault("track_calls", []).append(t0)
                try:
                    return real(*a, **kw)
                finally:
                    stats["track"] = stats.get("track", 0.0) + time.perf_counter() - t0
                    if isinstance(kw.get("stats"), dict) and "timeline" in kw["stats"]:
                        stats.setdefault("timelines", []).append(kw["stats"]["timeline"])

            tracker.track_video = timed
            try:
                yield
            finally:
                tracker.track_video = real

        return ctx()


def sync():
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def pipeline_rate(pipe, actor, params: np.ndarray, batch_sizes: list[int], call: dict, compiled=None) -> dict:
    """The loaded pipeline called directly on `params` in batches of `batch_sizes`: frames/s, and the
    seconds of each call (`call_s`; a call returns host arrays, so each is synchronised). compiled: the
    job's CompiledBatches (retarget.compiling), whose padded batches the calls then go through."""
    n, s = 0, 0
    calls = []
    sync()
    t0 = time.perf_counter()
    for b in batch_sizes:
        if s >= len(params):
            break
        idx = list(range(s, min(len(params), s + b)))
        t = time.perf_counter()
        if compiled is not None:
            compiled.render(lambda sub: pipe(actor, params[sub], frame_indices=sub, **call), idx)
        else:
            pipe(actor, params[idx], frame_indices=idx, **call)
        calls.append(time.perf_counter() - t)
        n += len(idx)
        s += b
    sync()
    secs = time.perf_counter() - t0
    return {"frames": n, "seconds": secs, "fps": n / secs, "call_s": [round(c, 4) for c in calls]}


@contextlib.contextmanager
def overlap_stats(into: dict):
    """A context in which retarget.overlap.render_and_write's stats (each render call's seconds,
    the renderer's waits for the saver) are also copied into `into`."""
    from render import video
    from retarget import overlap

    real = overlap.render_and_write
    real_write = video.VideoWriter.write
    into["encode_s"] = 0.0

    def timed_write(self, *a, **kw):  # the encoder's share of the writer's `write_s` (the rest: paste-back waits)
        t = time.perf_counter()
        try:
            return real_write(self, *a, **kw)
        finally:
            into["encode_s"] += time.perf_counter() - t

    def seen(*a, **kw):
        stats = kw.get("stats")
        kw["stats"] = stats = {} if stats is None else stats
        try:
            return real(*a, **kw)
        finally:
            into.update(stats)

    overlap.render_and_write = seen
    video.VideoWriter.write = timed_write
    try:
        yield
    finally:
        overlap.render_and_write = real
        video.VideoWriter.write = real_write


class CallLog:
    """Counts the pipeline's calls (frames per call) and the out-of-memory errors they raise."""

    def __init__(self):
        self.sizes: list[int] = []
        self.ooms = 0

    @classmethod
    def install(cls, pipe_cls):
        log = cls()
        real = pipe_cls.__call__

        def call(self, actor, expressions, *a, **kw):
            log.sizes.append(len(expressions))
            try:
                return real(self, actor, expressions, *a, **kw)
            except Exception as e:
                from retarget.oom import is_oom

                if is_oom(e):
                    log.ooms += 1
                raise

        pipe_cls.__call__ = call
        log.restore = lambda: setattr(pipe_cls, "__call__", real)
        return log


# -- one mode -------------------------------------------------------------------------------------

def one_mode(mode: str, frames: int, pipe, inputs, weights, args, device: str, work: Path, *, ahead: bool = True,
             reference: dict | None = None, paste_back: bool = True, compile: str = "auto",
             preset: str = "medium", early_write: bool = True, writer_process: bool = True,
             writer_nice: int = 10) -> dict:
    """One whole job in `mode`; ahead: retarget.run.RENDER_AHEAD (render while tracking) for it;
    reference: an earlier row of the same mode whose pipeline rate is reused (same frames, batches);
    paste_back: RunOptions.paste_back (off: the 512 px crops are encoded, no paste-back threads);
    compile: RunOptions.compile (the pipeline rate is then measured through the job's compiled batches);
    preset: the output's libx264 preset (render.video.X264_PRESET for this job); early_write:
    retarget.run.EARLY_WRITE (the frames rendered ahead written into the video while tracking);
    writer_process: retarget.run.WRITER_PROCESS (paste-back and encoding in a process of their own);
    writer_nice: that process's niceness (retarget.sink_process.WRITER_NICE)."""
    import torch

    import retarget.run as rr
    from retarget.run import RunOptions, RunSummary, auto_batch, render_call, run

    drive, actor_path = inputs
    fast = mode == "fast"
    steps = args.steps or (2 if args.tiny else None)
    opts = RunOptions(fast=fast, batch=args.batch, device=device, paste_back=paste_back, end=frames / FPS, keep_work=True,
                      compile=compile,
                      **({"steps": steps} if steps else {}))
    call = render_call(opts)
    has_stages = "stages" in {f.name for f in dataclasses.fields(RunSummary)}
    # Warm-up: one call of the job's batch size, so that neither the job nor the pipeline pass
    # pays the first call's costs (cuDNN/cuBLAS heuristics, allocator growth).
    from retarget.run import read_image

    actor0 = pipe.prepare_actor(read_image(actor_path), generator=torch.Generator("cpu").manual_seed(0))
    b0 = args.batch or auto_batch(device, pipe.image_size)
    pipe(actor0, np.zeros((b0, 55), np.float32), **call)
    del actor0
    sync()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        base_alloc = torch.cuda.memory_allocated()
    clock = StageClock()
    stats: dict = {}
    ostats: dict = {}  # retarget.overlap's: the render calls after tracking
    out = work / f"{mode}.mp4"
    lines: list[str] = []
    kept_setting, rr.RENDER_AHEAD = rr.RENDER_AHEAD, ahead
    kept_early, rr.EARLY_WRITE = rr.EARLY_WRITE, early_write
    kept_writer, rr.WRITER_PROCESS = rr.WRITER_PROCESS, writer_process
    from retarget import sink_process

    kept_nice, sink_process.WRITER_NICE = sink_process.WRITER_NICE, writer_nice
    made: list = []  # the job's RenderAhead, for the times its batches began
    real_ahead = rr.RenderAhead

    class SeenAhead(real_ahead):
        def __init__(self, *a, **kw):
            super().__init__(*a, **kw)
            made.append(self)

    rr.RenderAhead = SeenAhead
    from render import video

    kept_preset, video.X264_PRESET = video.X264_PRESET, preset
    try:
        with StageClock.tracking(stats), overlap_stats(ostats):
            t0 = time.perf_counter()
            summary = run(drive, actor_path, out, opts, weights=weights, log=lines.append,
                          prepare=clock.prepare_hook(pipe, wrap_render=not has_stages))
            sync()
            job_s = time.perf_counter() - t0
    finally:
        rr.RENDER_AHEAD = kept_setting
        rr.EARLY_WRITE = kept_early
        rr.WRITER_PROCESS = kept_writer
        sink_process.WRITER_NICE = kept_nice
        rr.RenderAhead = real_ahead
        video.X264_PRESET = kept_preset
    row = {"mode": mode, "ahead": ahead, "early_write": early_write, "writer_process": writer_process,
           "writer_nice": writer_nice if writer_process else None, "paste_back": paste_back, "compile_setting": compile, "x264_preset": preset,
           "output_mb": out.stat().st_size / 2**20 if out.is_file() else None, "ahead_log": [l for l in lines if "while tracking (" in l], "frames": summary.frames, "steps": call["steps"], "guidance": call["guidance"],
           "scheduler": call["scheduler"], "job_s": job_s, "job_fps": summary.frames / job_s,
           "auto_batch": not args.batch}
    # When things happened, in seconds from the job's start: the tracker's own events (its start,
    # workers, encoder, first frame and faces, each encoder batch) and each batch rendered ahead.
    if stats.get("track_calls"):
        shift = stats["track_calls"][0] - t0
        row["timeline"] = [["track_video called", round(shift, 4)]] + [
            [event, round(shift + s, 4)] for event, s in (stats.get("timelines") or [[]])[0]]
    if made and getattr(made[0], "batch_starts", None):
        row["ahead_batch_starts_s"] = [round(b - t0, 4) for b in made[0].batch_starts]
    if torch.cuda.is_available():
        row.update(peak_allocated_gib=torch.cuda.max_memory_allocated() / 2**30,
                   peak_reserved_gib=torch.cuda.max_memory_reserved() / 2**30,
                   models_gib=base_alloc / 2**30)
        if args.memory_gb:
            row["under_cap"] = row["peak_reserved_gib"] < args.memory_gb
    if has_stages and getattr(summary, "stages", None):
        row["stages"] = {k: float(v) if isinstance(v, (int, float)) else v for k, v in summary.stages.items()}
        row["stages_from"] = "RunSummary.stages"
    else:
        st = {"track": stats.get("track", 0.0), "prepare": clock.t.get("prepare", 0.0),
              "render": clock.t.get("render", 0.0)}
        st["write_tail"] = t0 + job_s - clock.t["render_end"] if "render_end" in clock.t else 0.0
        st["other"] = job_s - sum(st.values())
        st["total"] = job_s
        row["stages"] = st
        row["stages_from"] = "timed around the job (bench/run.py)"
    r = clock.rendering
    work_folder = out.parent / f".{out.name}.work"  # kept (keep_work) to read the batch the job chose
    try:
        batch = int(json.loads((work_folder / "manifest.json").read_text())["batch"])
    except (OSError, KeyError, ValueError):
        batch = clock.batch_sizes[0] if clock.batch_sizes else (opts.batch or auto_batch(device, pipe.image_size))
    shutil.rmtree(work_folder, ignore_errors=True)
    sizes = clock.batch_sizes or [batch] * -(-summary.frames // batch)
    row["batch"] = batch
    todo = summary.params[: args.pipeline_frames or None]
    row["compile"] = summary.compile
    row["pipeline"] = reference["pipeline"] if reference else pipeline_rate(pipe, r.actor, todo, sizes, r.call,
                                                                            getattr(r, "compiled", None))
    row["pipeline_fps"] = row["pipeline"]["fps"]
    # Same batches alone and in the job (after tracking): a slower median call in the job is contention
    # (cores, GIL, memory); equal medians put the loss between the calls or before the first.
    job_calls = [c for c in ostats.get("batch_s", [])]
    row["render_calls"] = {"job_median_s": float(np.median(job_calls)) if job_calls else None,
                           "job_n": len(job_calls), "render_waits": ostats.get("render_waits"),
                           "alone_median_s": float(np.median(row["pipeline"]["call_s"])) if row["pipeline"].get("call_s") else None,
                           "job_s": [round(c, 4) for c in job_calls]}
    row["threads_s"] = {k: round(float(ostats[k]), 3) for k in ("save_s", "offer_wait_s", "take_wait_s", "load_s", "write_s",
                                                                 "encode_s") if k in ostats}
    if writer_process and "encode_s" in row["threads_s"]:
        del row["threads_s"]["encode_s"]  # the encoder ran in the writer process: not timed from here
    row["ratio"] = row["job_fps"] / row["pipeline_fps"]
    if isinstance(row["stages"].get("render"), float) and row["stages"]["render"] > 0:
        row["render_stage_fps"] = summary.frames / row["stages"]["render"]
    out.unlink(missing_ok=True)
    return row


def oom_check(pipe, inputs, weights, device: str, work: Path, clip_frames: int, cap_bytes: int | None = None) -> dict:
    """A fast-mode job with the automatic batch (three batches long) where, once the first batch
    is rendered, the per-process memory cap (torch.cuda.set_per_process_memory_fraction: a smaller
    card) is lowered to what is reserved then plus OOM_ROOM of the memory that batch allocated: the
    next full batch runs out of memory for real and must be split (retarget.oom.split_on_oom); the
    job must finish with every frame. (Two earlier forms of this check used a ballast tensor: sized
    on allocated memory it left less than one frame, the models' partly used segments taking the
    rest; sized on reserved memory, whose peak counts the allocator's cache, it left a whole batch.)"""
    import torch

    from retarget.pipeline import RetargetPipeline
    from retarget.run import RunOptions, auto_batch, run

    batch = auto_batch(device, pipe.image_size)
    frames = min(clip_frames, 3 * batch)
    opts = RunOptions(fast=True, batch=0, device=device, paste_back=True, end=frames / FPS)
    hook = StageClock().prepare_hook(pipe, wrap_render=True)
    seen: dict = {}
    total = torch.cuda.get_device_properties(0).total_memory

    def prepare(*a, **kw):
        r = hook(*a, **kw)
        inner = r.render_batches

        def render_batches(batches, params):
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            for idx, images in inner(batches, params):
                if not seen:  # once per job: rendering ahead calls this once per batch
                    working = torch.cuda.max_memory_allocated() - base
                    torch.cuda.empty_cache()
                    limit = torch.cuda.memory_reserved() + int(OOM_ROOM * working)
                    seen.update(batch_working_gib=working / 2**30, cap_then_gib=limit / 2**30)
                    torch.cuda.set_per_process_memory_fraction(min(1.0, limit / total))
                yield idx, images

        r.render_batches = render_batches
        return r

    log = CallLog.install(RetargetPipeline)
    try:
        summary = run(*inputs, work / "oom.mp4", opts, weights=weights, log=lambda *_: None, prepare=prepare)
        ok, err = summary.frames == summary.rendered == frames, None
    except Exception as e:  # the check reports, it does not stop the bench
        ok, err = False, f"{type(e).__name__}: {str(e)[:300]}"
    finally:
        log.restore()
        torch.cuda.set_per_process_memory_fraction(min(1.0, cap_bytes / total) if cap_bytes else 1.0)
        torch.cuda.empty_cache()
    return {"frames": frames, "auto_batch": batch, "call_sizes": log.sizes, "ooms": log.ooms, **seen,
            "finished": ok, "error": err, "halved": log.ooms > 0 and min(log.sizes, default=batch) < batch}


# The room the OOM check leaves, as a share of the first batch's working memory: a full batch
# does not fit, half of one does, with a margin for the allocator's rounding.
OOM_ROOM = 0.7


# -- main -----------------------------------------------------------------------------------------

def track_probe(drive: Path, layout, device: str, workers: str, frames: int) -> dict:
    """track_video alone on `frames` frames of `drive` with `workers` detection processes ("auto"
    or a number): seconds, and its timeline (tracking.tracker's events, seconds from the call)."""
    from tracking.tracker import TrackOptions, track_video

    stats: dict = {}
    opts = TrackOptions(device=device, detect_workers=-1 if workers == "auto" else int(workers), end=frames / FPS)
    t0 = time.perf_counter()
    track_video(drive, smirk_path=layout.smirk_ckpt, options=opts, progress=False, stats=stats)
    seconds = time.perf_counter() - t0
    rows = [e for e, _ in stats["timeline"] if e.startswith("rows ")]
    return {"workers": workers, "frames": stats["frames_tracked"], "seconds": seconds,
            "first_rows": rows[0] if rows else None, "timeline": stats["timeline"]}


def versions() -> dict:
    import importlib.metadata as md

    out = {"python": platform.python_version()}
    for name in ("torch", "diffusers", "transformers", "dlib-bin", "dlib", "av", "opencv-python-headless",
                 "opencv-python", "timm", "numpy"):
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            pass
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiny", action="store_true", help="CPU smoke run: tiny weights, a short 320x180 clip")
    ap.add_argument("--modes", default=",".join(MODES), help="comma-separated, of fast, quality (default both, fast first)")
    ap.add_argument("--frames", type=int, default=None,
                    help="frames per mode (default: fast 1000, quality 300; tiny: 8)")
    ap.add_argument("--batch", type=int, default=0, help="frames per batch (default 0: the job's automatic batch)")
    ap.add_argument("--steps", type=int, default=None, help="denoising steps (default: the mode's; tiny: 2)")
    ap.add_argument("--pipeline-frames", type=int, default=0,
                    help="frames of the pipeline-rate pass (default 0: all of the job's)")
    ap.add_argument("--memory-gb", type=float, default=None,
                    help="cap this process's GPU memory at this many GiB (set_per_process_memory_fraction) before loading")
    ap.add_argument("--oom-check", action=argparse.BooleanOptionalAction, default=True,
                    help="after the modes, the real out-of-memory check (GPU; default on)")
    ap.add_argument("--deadline", type=float, default=480.0,
                    help="seconds for the whole bench; a mode whose estimate does not fit is skipped (default 480)")
    ap.add_argument("--faces", choices=("standin", "dlib"), default="standin",
                    help="face backend: the stand-in (bench/standin_faces.py, default) or the real dlib 68-point one")
    ap.add_argument("--predictor-5", default=None, metavar="DAT",
                    help="shape_predictor_5_face_landmarks.dat (default $RETARGET_STANDIN_5PT, else face-recognition-models')")
    ap.add_argument("--weights", default=None, metavar="DIR", help="use this weights folder instead of writing one")
    ap.add_argument("--oom-only", action="store_true", help="only the out-of-memory check (GPU)")
    ap.add_argument("--ahead", default="on",
                    help="render while tracking (retarget.ahead): on, off or on,off to compare in one run (default on)")
    ap.add_argument("--writer", default="process",
                    help="where paste-back and encoding run (retarget.run.WRITER_PROCESS): process, thread or "
                         "process,thread (default process)")
    ap.add_argument("--writer-nice", default="10", metavar="N,...",
                    help="the writer process's niceness (retarget.sink_process.WRITER_NICE), e.g. 10,0,10 (default 10)")
    ap.add_argument("--early-write", default="on",
                    help="write the video while tracking (retarget.run.EARLY_WRITE): on, off or on,off (default on)")
    ap.add_argument("--paste-back", default="on",
                    help="paste the faces back into the 1080p photo (on), or write the 512 px crops (off); on,off "
                         "compares in one run: without paste-back the writer's CPU work is a fraction")
    ap.add_argument("--compile", default="auto", metavar="SETTING,...",
                    help="--compile of each job: auto, on, off, or a list (on,on: the second job finds the "
                         "compiled code warm); default auto, as the CLI")
    ap.add_argument("--x264-preset", default="medium", metavar="PRESET,...",
                    help="libx264 preset of the output (render.video.X264_PRESET; default medium, as the CLI); a list "
                         "compares (e.g. medium,veryfast)")
    ap.add_argument("--warm-tracker", action=argparse.BooleanOptionalAction, default=True,
                    help="track 64 frames before the jobs (GPU), as the pipeline is warmed by a call: the SMIRK "
                         "encoder's first calls in a process cost seconds (cuDNN plans); --no-warm-tracker "
                         "leaves that in the first job")
    ap.add_argument("--kernels", default="default", metavar="VARIANT,...",
                    help="kernel switches per job (retarget/kernels.py): default, or a KernelOptions flag to turn on "
                         "for the job and its pipeline pass, e.g. default,cuda_graph (default: default)")
    ap.add_argument("--track-probe", default="", metavar="WORKERS,...",
                    help="before the jobs, track the clip alone once per item (detection processes: a number "
                         "or auto) with the tracker's timeline, e.g. auto,0,auto")
    ap.add_argument("--out", default=None, help="folder for the JSON (default bench/results)")
    args = ap.parse_args(argv)
    start = time.perf_counter()

    import torch

    modes = [m for m in args.modes.split(",") if m]
    if set(modes) - set(MODES) or not modes:
        ap.error("--modes: choose from fast, quality")
    def on_off(option: str, value: str) -> list[bool]:
        got = [{"on": True, "off": False}.get(a) for a in value.split(",") if a]
        if None in got or not got:
            ap.error(f"{option}: a comma-separated list of on, off")
        return got

    aheads = on_off("--ahead", args.ahead)
    earlies = on_off("--early-write", args.early_write)
    writers = [{"process": True, "thread": False}.get(w) for w in args.writer.split(",") if w]
    if not writers or None in writers:
        ap.error("--writer: a comma-separated list of process, thread")
    try:
        nices = [int(v) for v in args.writer_nice.split(",") if v]
    except ValueError:
        nices = []
    if not nices:
        ap.error("--writer-nice: a comma-separated list of integers")
    presets = [p for p in args.x264_preset.split(",") if p]
    compiles = [c for c in args.compile.split(",") if c]
    if not compiles or set(compiles) - {"auto", "on", "off"}:
        ap.error("--compile: a comma-separated list of auto, on, off")
    pastes = on_off("--paste-back", args.paste_back)
    from retarget.kernels import KernelOptions

    variants = [k for k in args.kernels.split(",") if k]
    flags = {f.name for f in dataclasses.fields(KernelOptions) if f.type in (bool, "bool")}
    if not variants or set(variants) - flags - {"default"}:
        ap.error(f"--kernels: default or any of {', '.join(sorted(flags))}")
    args.tiny = args.tiny or not torch.cuda.is_available()
    device = "cpu" if args.tiny else "cuda"
    if args.faces == "standin":
        from bench import standin_faces

        standin_faces.install(args.predictor_5)
        faces_note = standin_faces.StandinFaces.name
    else:
        faces_note = "dlib (HOG + 68-point predictor)"
    cap = None
    if args.memory_gb and not args.tiny:
        total = torch.cuda.get_device_properties(0).total_memory
        cap = min(1.0, args.memory_gb * 2**30 / total)
        torch.cuda.set_per_process_memory_fraction(cap)
    frames = {m: args.frames or (8 if args.tiny else DEFAULT_FRAMES[m]) for m in modes}
    width, height = (320, 180) if args.tiny else (1920, 1080)
    work = Path(tempfile.mkdtemp(prefix="bench-run-"))
    info: dict = {"date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
                  "device": "cpu" if args.tiny else torch.cuda.get_device_name(0), "tiny": args.tiny,
                  "host_cpus": os.cpu_count(), "versions": versions(), "faces": faces_note,
                  "clip": f"{width}x{height} {FPS:g} fps, H.264 + AAC", "actor_photo": f"{width}x{height}",
                  "memory_cap_gib": args.memory_gb if cap else None, "memory_fraction": cap,
                  "gpu_total_gib": None if args.tiny else torch.cuda.get_device_properties(0).total_memory / 2**30,
                  "rows": [], "skipped": []}
    try:
        t0 = time.perf_counter()
        if args.weights:
            weights = Path(args.weights)
        elif args.tiny:
            from retarget.tiny import write_tiny_weights

            weights = write_tiny_weights(work / "weights")
        else:
            from bench.scale import write_full_weights

            print("writing full-size random weights ...", flush=True)
            weights = write_full_weights(work / "weights")
        info["weights_write_s"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        inputs = make_inputs(work / "inputs", max(frames.values()), width, height)
        info["inputs_make_s"] = time.perf_counter() - t0
        print(f"inputs: {max(frames.values())} frames {width}x{height} in {info['inputs_make_s']:.1f}s", flush=True)

        from retarget.pipeline import RetargetPipeline
        from retarget.run import resolve_device
        from retarget.weights import WeightsLayout

        layout = WeightsLayout(weights)
        dev, dtype = resolve_device(device, "auto")
        t0 = time.perf_counter()
        pipe = RetargetPipeline.from_weights(layout, device=dev, dtype=dtype, lcm="fast" in modes)
        sync()
        info["load_s"] = time.perf_counter() - t0
        if args.warm_tracker and not args.tiny and not args.track_probe:
            info["tracker_warmup"] = track_probe(inputs[0], layout, device, "auto", 64)
            print(f"tracker warm-up: {info['tracker_warmup']['seconds']:.2f}s for 64 frames", flush=True)
        for item in [w for w in args.track_probe.split(",") if w]:
            info.setdefault("track_probe", []).append(track_probe(inputs[0], layout, device, item, max(frames.values())))
            p = info["track_probe"][-1]
            print(f"track probe (workers {item}): {p['frames']} frames in {p['seconds']:.2f}s; "
                  + ", ".join(f"{e} {t:.2f}" for e, t in p["timeline"] if not e.startswith("rows ") or e == p["first_rows"]),
                  flush=True)
        for mode in [] if args.oom_only else modes:
            left = args.deadline - (time.perf_counter() - start)
            estimate = (frames[mode] * (GPU_SECONDS_PER_FRAME[mode] if not args.tiny else 0.0) + 20) * len(aheads) * len(pastes) * len(compiles) * len(presets) * len(variants) * len(earlies) * len(writers) * len(nices)
            if not args.tiny and estimate > left:
                info["skipped"].append(f"{mode}: estimated {estimate:.0f}s, {left:.0f}s left of --deadline")
                print(f"skipping {mode} mode: estimated {estimate:.0f}s > {left:.0f}s left", flush=True)
                continue
            for variant in variants:
                first: dict = {}  # per --compile setting: its first row, whose pipeline rate the others reuse
                pipe.kernels = KernelOptions(**({} if variant == "default" else {variant: True}))
                try:
                    for comp, ahead, paste, preset, early, wp, nice in [
                            (c, a, p, x, e, w, n) for c in compiles for a in aheads for p in pastes for x in presets
                            for e in earlies for w in writers for n in (nices if w else nices[:1])]:
                        row = one_mode(mode, frames[mode], pipe, inputs, layout, args, device, work, ahead=ahead,
                                       reference=first.get(comp), paste_back=paste, compile=comp, preset=preset,
                                       early_write=early, writer_process=wp, writer_nice=nice)
                        row["kernels"] = variant
                        first.setdefault(comp, row)
                        # As a cold `retarget run` would be: the models' load inside the job.
                        row["ratio_with_load"] = row["frames"] / (row["job_s"] + info["load_s"]) / row["pipeline_fps"]
                        info["rows"].append(row)
                        print(f"{mode} ({variant}, ahead {'on' if ahead else 'off'}, early write {'on' if early else 'off'}, "
                              f"writer {f'process (nice {nice})' if wp else 'threads'}, "
                              f"paste-back {'on' if paste else 'off'}, "
                              f"compile {comp}: {row['compile'] or '-'}, x264 {preset}): "
                              f"job {row['job_fps']:.2f} "
                              f"frames/s, pipeline {row['pipeline_fps']:.2f} frames/s, ratio {row['ratio'] * 100:.1f}%"
                              + (f"; {row['ahead_log'][0]}" if row["ahead_log"] else ""), flush=True)
                        rc = row["render_calls"]
                        if rc["job_median_s"] and rc["alone_median_s"]:
                            print(f"  render call median: job {rc['job_median_s']:.3f}s ({rc['job_n']} calls after "
                                  f"tracking), alone {rc['alone_median_s']:.3f}s; renderer waited for the saver "
                                  f"{rc['render_waits']} times", flush=True)
                        print("  threads (s): " + ", ".join(f"{k} {v:.2f}" for k, v in row["threads_s"].items()), flush=True)
                finally:
                    pipe.kernels = KernelOptions()
        if args.oom_check and not args.tiny and args.deadline - (time.perf_counter() - start) < 40:
            info["skipped"].append("oom check: under 40s left of --deadline")
        elif args.oom_check and not args.tiny:
            info["oom_check"] = oom_check(pipe, inputs, layout, device, work, max(frames.values()),
                                          cap_bytes=int(cap * torch.cuda.get_device_properties(0).total_memory)
                                          if cap else None)
            print(f"oom check: {info['oom_check']}", flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    info["bench_s"] = time.perf_counter() - start

    print(f"\n{info['device']}, {info['host_cpus']} CPUs, faces: {faces_note}"
          + (f", memory cap {args.memory_gb:g} GiB" if cap else ""))
    print(f"load {info['load_s']:.1f}s (not in the jobs), weights written in {info['weights_write_s']:.1f}s")
    head = f"{'mode':34s} {'frames':>6s} {'batch':>5s} {'job f/s':>8s} {'pipe f/s':>8s} {'ratio':>6s} {'+load':>6s} {'peak GiB':>8s}  stages (s)"
    print(head)
    for r in info["rows"]:
        stages = " ".join(f"{k}={v:.2f}" if isinstance(v, float) else f"{k}={v}"
                          for k, v in r["stages"].items() if k != "total")
        peak = f"{r['peak_reserved_gib']:8.2f}" if "peak_reserved_gib" in r else f"{'-':>8s}"
        name = (f"{r['mode']}{'' if r.get('ahead', True) else ' (serial)'}{'' if r.get('paste_back', True) else ' crops'}"
                f"{'' if r.get('early_write', True) else ' late-write'}"
                f"{' threads' if not r.get('writer_process', False) else '' if r.get('writer_nice') == 10 else ' nice ' + str(r.get('writer_nice'))}"
                f"{'' if r.get('compile_setting', 'auto') == 'auto' else ' compile ' + r['compile_setting']}"
                f"{'' if r.get('x264_preset', 'medium') == 'medium' else ' ' + r['x264_preset']}"
                f"{'' if r.get('kernels', 'default') == 'default' else ' ' + r['kernels']}")
        print(f"{name:34s} {r['frames']:6d} {r['batch']:5d} {r['job_fps']:8.2f} {r['pipeline_fps']:8.2f} "
              f"{r['ratio'] * 100:5.1f}% {r['ratio_with_load'] * 100:5.1f}% {peak}  {stages}")
    for s in info["skipped"]:
        print(f"skipped {s}")
    print("ratio: whole job / pipeline frames/s, models loaded before the job (+load: loaded inside it); "
          "goal >= 90%"
          + (f"; peak under {args.memory_gb:g} GiB" if cap else ""))
    out = Path(args.out) if args.out else Path(__file__).resolve().parent / "results"
    out.mkdir(parents=True, exist_ok=True)
    gpu = "cpu" if args.tiny else info["device"].replace(" ", "_")
    cap_tag = f"_{args.memory_gb:g}GB" if cap else ""
    name = f"run_{gpu}{cap_tag}_{dt.date.today().isoformat()}.json"
    (out / name).write_text(json.dumps(info, indent=2))
    print(f"wrote {out / name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
