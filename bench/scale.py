"""Ray's overhead on one GPU: whole-job frames/s for the same clip run directly and through Ray
with one GPU actor, in one run (variants interleaved, median of --repeat).

    python bench/scale.py                 # GPU: full-size random weights (SD 1.5 sizes), fp16, 25 DPM++ steps
    python bench/scale.py --tiny          # CPU smoke run: tiny weights, 1 thread direct vs one 1-CPU actor

Every variant runs `retarget run` on a synthetic clip with a track file (tracking excluded: it
runs on the driver either way) and the same batch size: actor preparation, rendering into the
work folder, paste-back and writing the video. Ray is connected first (a cluster that users
operate is already running; the connect time is reported apart).

    cli_direct   `retarget run` in a fresh process (bench/cli_job.py), timed from outside: Python's
                 start, imports, CUDA, model load, the job: what a user waits for (the default pair)
    cli_ray      `retarget run --ray` in a fresh process joining the running cluster: its worker's
                 process, imports, CUDA and model load overlap the driver's own start
    cli_ray_t1   cli_ray with `--ray-worker-threads 1` (the GPU worker's host-side work on one CPU
                 thread, as before that option): what the default threads buy (not in the default list)
    direct       models loaded inside the timed job, in this (already warm) process
    ray          one GPU worker started inside the timed job: a new process imports torch and
                 loads the models (what `retarget run --ray` costs when nothing overlaps it)
    direct_warm  models loaded before the timer (the next job of `retarget batch`)
    ray_warm     the worker loaded before the timer (the next job of `retarget batch --ray`)

Reported: job seconds and frames/s, render-stage frames/s (first batch asked to last frame
saved; in-process variants), Ray's overhead (direct / ray - 1) per pair, and where a cold worker's
start goes (scheduling, process start, imports, CUDA, models, face finder). Target: <= 5%.
Then where each variant's seconds go (medians; the columns add up to the job):

    to run()     process launched -> run() entered: Python's start, the CLI's imports (cli_* only)
    run->render  run() entered -> first batch asked: the heavy imports (torch, diffusers: run() makes
                 them), open, track, model load (direct) or waiting for the worker (Ray), prepare
    prepare      of run->render: the actor's preparation (Ray: the wait for a ready worker included)
    render       first batch asked -> last frame rendered
    write tail   last frame rendered -> the video renamed into place
    after run    run() returned -> process gone (Ray: stats, actors killed, disconnect; exit)

and for Ray variants the job's timeline (seconds since the driver process started: ray imported,
connected, actors asked, driver imported (retarget.pipeline, which unpickling the prepared actor
needs), worker ready, prepare asked/done, first batch sent, first/last frames back)
with the worker's own figures (prepare, wait for the first batch, render sum, idle between batches),
the marks in time order.
`direct` vs `ray` charges the Ray worker a fresh process's costs that this warm process no longer
pays (CUDA context, first kernels): it overstates the overhead a user sees; `cli_*` compares
like with like.
Writes bench/results/scale_<device>_<date>.json (`--out`), and after every job its .partial.json
(the rows so far: a run stopped by a time limit keeps the jobs it finished).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import gc
import json
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def write_full_weights(root: Path) -> Path:
    """The release layout with full-size random weights: SD 1.5 UNet and VAE, CLIP-L encoder, adapters
    and LoRAs at the release's sizes (the tiny set's ArcFace, SMIRK and tokenizer: they are not timed)."""
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from safetensors.torch import save_file
    from transformers import CLIPTextConfig, CLIPTextModel

    from bench.pipeline import CLIP_L, LCM_LORA_RANK, REF_LORA_RANK, SD15_UNET, SD15_VAE
    from retarget import tiny

    tiny.write_tiny_weights(root)
    torch.manual_seed(0)
    unet = UNet2DConditionModel(**SD15_UNET).eval()
    shutil.rmtree(root / "arc2face")
    unet.to(torch.float16).save_pretrained(root / "arc2face")
    unet = unet.float()
    shutil.rmtree(root / "vae")
    AutoencoderKL(**SD15_VAE).to(torch.float16).save_pretrained(root / "vae")
    vocab = json.loads((root / "encoder" / "config.json").read_text())["vocab_size"]
    cfg = CLIPTextConfig(**dict(CLIP_L, vocab_size=vocab, bos_token_id=vocab - 2, eos_token_id=vocab - 1,
                                pad_token_id=1))
    cfg.save_pretrained(root / "encoder")
    torch.save(CLIPTextModel(cfg).half().state_dict(), root / "encoder" / "pytorch_model.bin")
    torch.save(tiny.exp_adapter_state_dict(unet, "linear"), root / "exp_adapter" / "exp_adapter.bin")
    save_file(tiny.ref_lora_state_dict(unet, rank=REF_LORA_RANK), root / "ref_adapter" / "pytorch_lora_weights.safetensors")
    save_file(tiny.lcm_lora_state_dict(unet, rank=LCM_LORA_RANK), root / "lcm_lora" / "pytorch_lora_weights.safetensors")
    (root / "TINY_WEIGHTS.txt").unlink()
    return root


def make_inputs(root: Path, frames: int, fps: float = 25.0) -> tuple[Path, Path]:
    """The sample driving clip (`frames` frames, 128 px) and actor photo, and `faces.json`: their
    faces found here by dlib, to be replayed where dlib is missing (bench/replayed_faces.py)."""
    from bench.replayed_faces import record
    from render.storyboard import save_image
    from retarget.samples import sample_actor, write_sample_drive

    root.mkdir(parents=True, exist_ok=True)
    drive = write_sample_drive(root / "drive.mp4", seconds=frames / fps, fps=fps, size=128)
    actor = root / "actor.png"
    save_image(actor, sample_actor())
    record(root / "faces.json", [actor])
    return drive, actor


def make_clip(root: Path, frames: int, fps: float = 25.0, inputs: Path | None = None):
    """A driving clip of `frames` frames, the sample actor photo and a track of random expressions.
    inputs: a folder made by --make-inputs (drive.mp4, actor.png, faces.json) to use instead."""
    from tracking.track import Track

    if inputs is None:
        drive, actor = make_inputs(root, frames, fps)
    else:
        drive, actor = inputs / "drive.mp4", inputs / "actor.png"
    params = (np.random.default_rng(0).standard_normal((frames, 55)) * 0.8).astype(np.float32)
    track = root / "drive.track.npz"
    Track(raw=params, params=params, valid=np.ones(frames, bool), times=np.arange(frames) / fps, fps=fps).save(track)
    return drive, actor, track


def timed_prepare(prepare, stats: dict):
    """Wrap a prepare= hook so the Rendering records the render stage's time and frame count."""
    from retarget.run import prepare_rendering

    def hook(*a, **kw):
        r = (prepare or prepare_rendering)(*a, **kw)
        inner = r.render_batches or dataclasses.replace(r).render

        def render_batches(batches, params):
            t0, n = time.perf_counter(), 0
            for idx, images in inner(batches, params):
                n += len(idx)
                yield idx, images
            stats.update(render_s=time.perf_counter() - t0, render_frames=n)

        r.render_batches = render_batches
        return r

    return hook


def cli_job(variant: str, inputs, opts, weights, ray_opts, out: Path, faces: str | None) -> dict:
    """`retarget run` as a user types it, in a fresh process (bench/cli_job.py): Python's start, the
    imports, CUDA and the models are inside the time, for the direct run as for the Ray run (which
    joins the running cluster and starts its worker, as `--ray` does)."""
    import os
    import re
    import subprocess

    cmd = [sys.executable, str(Path(__file__).resolve().parent / "cli_job.py")]
    if faces:
        cmd += ["--faces", faces]
    ray_run = variant.startswith("cli_ray")
    if ray_run:
        cmd += ["--ray-address", "auto"]
    cmd += ["--", "run", str(inputs[0]), str(inputs[1]), "-o", str(out), "--weights", str(weights),
            "--steps", str(opts.steps), "--batch", str(opts.batch), "--device", opts.device, "--track", opts.track,
            "--keep-work"]
    if ray_run:
        cmd += ["--ray", "--ray-workers", str(ray_opts.workers or 1)]
        if ray_opts.cpus_per_worker:
            cmd += ["--ray-cpus-per-worker", str(ray_opts.cpus_per_worker)]
        if ray_opts.worker_threads:
            cmd += ["--ray-worker-threads", str(ray_opts.worker_threads)]
    env = dict(os.environ, PYTHONUNBUFFERED="1", TQDM_DISABLE="1")
    if opts.device == "cpu":  # --tiny: one thread, as the one 1-CPU worker (fp32 sums round by thread count)
        env["OMP_NUM_THREADS"] = "1"
    launch, t0 = time.time(), time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True, env=env)
    job_s, ended = time.perf_counter() - t0, time.time()
    if done.returncode != 0:
        raise RuntimeError(f"{variant} failed ({done.returncode}): {done.stderr.strip()[-2000:]}")
    text = done.stdout + done.stderr
    m = re.search(r"done: (\d+) frames .* in ([\d.]+)s", text)
    row = dict(variant=variant, frames=int(m.group(1)), job_s=job_s, job_fps=int(m.group(1)) / job_s,
               run_s=float(m.group(2)), launch=launch, ended=ended)  # run_s: inside run(), after the process's start and imports
    import hashlib
    import json

    work = out.parent / f".{out.name}.work" / "frames"
    digest = hashlib.sha256()
    for png in sorted(work.glob("*.png")):  # the rendered frames, what the video is encoded from
        digest.update(png.read_bytes())
    row["frames_sha256"] = digest.hexdigest()[:16]
    shutil.rmtree(work.parent, ignore_errors=True)
    for name, blob in re.findall(r"^BENCH (stages|workers|worker-ready|host|timeline|process) (.*)$", text, flags=re.M):
        row[name] = json.loads(blob)
    ready = re.search(r"ray: worker 0 ready after ([\d.]+)s \((.*)\)", text)
    if ready:
        row["worker_start_s"] = float(ready.group(1))
        row["worker_start"] = {k: float(v) for k, v in re.findall(r"([a-z ]+?) ([\d.]+)s", ready.group(2))}
        row["worker_start"] = {k.strip(", "): v for k, v in row["worker_start"].items()}
    return row


def one_job(variant: str, inputs, opts, weights, ray_opts, out: Path) -> dict:
    import functools

    import torch

    from retarget.pipeline import RetargetPipeline
    from retarget.run import prepare_rendering, resolve_device, run
    from retarget.scale.pool import RayPool
    from retarget.weights import WeightsLayout

    stats: dict = {}
    layout = WeightsLayout(weights)
    quiet = dict(weights=layout, log=lambda *_: None)
    if variant == "direct":
        t0 = time.perf_counter()
        summary = run(*inputs, out, opts, prepare=timed_prepare(None, stats), **quiet)
    elif variant == "direct_warm":
        device, dtype = resolve_device(opts.device, opts.dtype)
        pipe = RetargetPipeline.from_weights(layout, device=device, dtype=dtype)
        t0 = time.perf_counter()
        summary = run(*inputs, out, opts, prepare=timed_prepare(functools.partial(prepare_rendering, pipe=pipe), stats),
                      **quiet)
        del pipe
    else:
        warm = variant == "ray_warm"
        if warm:
            pool = RayPool(ray_opts, layout, opts, log=lambda *_: None)
            pool.start()
            pool._wait_ready(1)
        t0 = time.perf_counter()
        if not warm:
            pool = RayPool(ray_opts, layout, opts, log=lambda *_: None)
            pool.start_async()  # as run_on_ray: the worker loads while the driver reads the inputs
        with pool:
            summary = run(*inputs, out, opts, prepare=timed_prepare(pool.prepare, stats), **quiet)
            stats["timeline"] = pool.timeline_report()
    job_s = time.perf_counter() - t0
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    row = dict(variant=variant, frames=summary.frames, job_s=job_s, job_fps=summary.frames / job_s,
               render_s=stats["render_s"], render_fps=stats["render_frames"] / stats["render_s"], stages=summary.stages)
    if "timeline" in stats:
        row["timeline"] = stats["timeline"]
    return row


VARIANTS = ("cli_direct", "cli_ray", "cli_ray_t1", "direct", "ray", "direct_warm", "ray_warm")
COLUMNS = ("job", "to run()", "run->render", "prepare", "render", "write tail", "after run")


def breakdown(row: dict) -> dict:
    """Where a row's job seconds go (COLUMNS; see the module's docstring): from the process marks of
    bench/cli_job.py and RunSummary.stages; in-process rows have only the stages."""
    st = row.get("stages") or {}
    out = {"job": row["job_s"]}
    if st:
        out.update({"run->render": st["total"] - st["render"] - st["write_tail"], "prepare": st["prepare"],
                    "render": st["render"], "write tail": st["write_tail"]})
    pm = row.get("process")
    if pm and "run_start" in pm and "launch" in row:
        out["to run()"] = pm["run_start"] - row["launch"]
        out["after run"] = row["ended"] - pm["run_end"]
    return out


TIMELINE = ("ray_imported", "connected", "actors_asked", "driver_imported", "run", "worker_ready", "prepare_asked",
            "prepare_done",
            "first_batch_sent", "first_frames_back", "last_frames_back")
WORKER = ("prepare_s", "wait_first_s", "render_s", "idle_s", "batches", "threads")


def print_breakdown(rows: list[dict]) -> dict:
    """The per-variant table of medians (COLUMNS) and, for Ray variants, the timeline; returns both."""
    variants = list(dict.fromkeys(r["variant"] for r in rows))
    table, lines = {}, {}
    for v in variants:
        parts = [breakdown(r) for r in rows if r["variant"] == v]
        table[v] = {c: float(np.median([p[c] for p in parts])) for c in COLUMNS if all(c in p for p in parts)}
        tls = [r["timeline"] for r in rows if r["variant"] == v and r.get("timeline")]
        if tls:
            marks = {k: float(np.median([t["marks"][k] for t in tls])) for k in TIMELINE
                     if all(k in t["marks"] for t in tls)}
            ws = [t["workers"][0] for t in tls if t["workers"]]
            worker = {k: float(np.median([w[k] for w in ws])) for k in WORKER
                      if ws and all(w.get(k) is not None for w in ws)}
            lines[v] = {"marks": marks, "worker0": worker}
    print("\nwhere the seconds go (median s; to run() + run->render + render + write tail + after run = job)")
    print(f"{'variant':12s}" + "".join(f"{c:>12s}" for c in COLUMNS))
    for v in variants:
        print(f"{v:12s}" + "".join(f"{table[v][c]:12.1f}" if c in table[v] else f"{'-':>12s}" for c in COLUMNS))
    for v, tl in lines.items():
        print(f"{v} timeline (s since the driver process started): "
              + ", ".join(f"{k.replace('_', ' ')} {t:.1f}"
                          for k, t in sorted(tl["marks"].items(), key=lambda kv: kv[1])))
        if tl["worker0"]:
            print(f"{v} worker 0: " + ", ".join(f"{k.replace('_s', '').replace('_', ' ')} {t:.1f}"
                                                + ("" if k in ("batches", "threads") else "s")
                                                for k, t in tl["worker0"].items()))
    return {"table": table, "timeline": lines}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiny", action="store_true", help="CPU smoke run on the tiny weights")
    ap.add_argument("--frames", type=int, default=None, help="clip length (default 300; tiny: 12)")
    ap.add_argument("--batch", type=int, default=None, help="frames per batch (default 16; tiny: 4)")
    ap.add_argument("--steps", type=int, default=None, help="DPM++ steps (default 25; tiny: 2)")
    ap.add_argument("--repeat", type=int, default=2, help="runs per variant, interleaved (default 2)")
    ap.add_argument("--workers", default="1",
                    help="Ray workers (GPUs) for cli_ray, a comma list to compare in one run, e.g. 1,2 "
                         "(rows cli_ray_x1, cli_ray_x2; default 1)")
    ap.add_argument("--variants", default="cli_direct,cli_ray,direct_warm,ray_warm",
                    help=f"comma-separated, of {', '.join(VARIANTS)}")
    ap.add_argument("--out", default=None, help="folder for the JSON (default bench/results)")
    ap.add_argument("--make-inputs", metavar="DIR", default=None,
                    help="only write the clip, photo and their recorded faces to DIR (here, where dlib is), then exit")
    ap.add_argument("--inputs", metavar="DIR", default=None,
                    help="use the inputs of --make-inputs and replay their faces (a GPU host without dlib)")
    args = ap.parse_args(argv)
    if args.make_inputs:
        print(make_inputs(Path(args.make_inputs), args.frames or 300))
        return 0

    import ray
    import torch

    from retarget.run import RunOptions
    from retarget.scale.options import RayOptions

    variants = [v for v in args.variants.split(",") if v]
    worker_counts = [int(n) for n in args.workers.split(",") if n]
    if set(variants) - set(VARIANTS):
        ap.error(f"--variants: choose from {', '.join(VARIANTS)}")
    tiny = args.tiny or not torch.cuda.is_available()
    frames = args.frames or (12 if tiny else 300)
    batch = args.batch or (4 if tiny else 16)
    steps = args.steps or (2 if tiny else 25)
    work = Path(tempfile.mkdtemp(prefix="bench-scale-"))
    try:
        if tiny:
            from retarget.tiny import write_tiny_weights

            torch.set_num_threads(1)  # as the one 1-CPU actor
            weights = write_tiny_weights(work / "weights")
        else:
            print("writing full-size random weights ...", flush=True)
            weights = write_full_weights(work / "weights")
        runtime_env, faces = {}, None
        if args.inputs:
            import os

            from bench import replayed_faces

            faces = str(Path(args.inputs).resolve() / "faces.json")
            replayed_faces.install(faces)
            root = str(Path(__file__).resolve().parents[1])
            runtime_env = {"env_vars": {replayed_faces.ENV: faces,
                                        "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))},
                           "worker_process_setup_hook": "bench.replayed_faces.install_from_env"}
        inputs = make_clip(work, frames, inputs=Path(args.inputs) if args.inputs else None)
        device = "cpu" if tiny else "cuda"
        opts = RunOptions(steps=steps, batch=batch, device=device, track=str(inputs[2]), paste_back=True)
        t0 = time.perf_counter()
        ray.init(include_dashboard=False, log_to_driver=False, runtime_env=runtime_env or None,
                 **(dict(num_cpus=2) if tiny else {}))
        connect_s = time.perf_counter() - t0
        ray_opts = RayOptions(workers=1, cpus_per_worker=1 if tiny else 0)
        rows = []
        gpu = torch.cuda.get_device_name(0) if not tiny else "cpu"
        out_dir = Path(args.out) if args.out else Path(__file__).resolve().parent / "results"
        out_dir.mkdir(parents=True, exist_ok=True)
        partial = out_dir / f"scale_{'cpu' if tiny else gpu.replace(' ', '_')}_{dt.date.today().isoformat()}.partial.json"

        def keep(row: dict) -> None:
            """The row so far, on disk at once (a run cut short by a time limit keeps its jobs), and its breakdown."""
            rows.append(row)
            partial.write_text(json.dumps(dict(device=gpu, frames=frames, batch=batch, steps=steps, complete=False,
                                               connect_s=connect_s, rows=rows), indent=2))
            b = breakdown(row)
            print(f"  {row['variant']} run {row['run']}: " + ", ".join(f"{c} {b[c]:.1f}s" for c in COLUMNS if c in b)
                  + (" | timeline: " + ", ".join(f"{k.replace('_', ' ')} {v:.1f}"
                                                 for k, v in sorted(row["timeline"]["marks"].items(),
                                                                    key=lambda kv: kv[1]))
                     if row.get("timeline") else ""), flush=True)
        for k in range(args.repeat):
            for variant in variants:
                out = work / f"{variant}{k}.mp4"
                if variant == "cli_ray" and len(worker_counts) > 1:
                    for n in worker_counts:
                        name = f"cli_ray_x{n}"
                        row = cli_job(name, inputs, opts, weights, dataclasses.replace(ray_opts, workers=n),
                                      work / f"{name}{k}.mp4", faces)
                        row.update(run=k, workers=n)
                        keep(row)
                        print(f"{name:11s} run {k}: job {row['job_s']:7.1f}s {row['job_fps']:7.2f} frames/s", flush=True)
                    continue
                if variant.startswith("cli_"):
                    one = dataclasses.replace(ray_opts, worker_threads=1) if variant == "cli_ray_t1" else ray_opts
                    row = cli_job(variant, inputs, opts, weights, one, out, faces)
                else:
                    row = one_job(variant, inputs[:2], opts, weights, ray_opts, out)
                row["run"] = k
                keep(row)
                render = f"render {row['render_fps']:7.2f} frames/s" if "render_fps" in row else (
                    f"in run() {row['run_s']:6.1f}s" + (f", worker ready after {row['worker_start_s']:.1f}s"
                                                        if "worker_start_s" in row else ""))
                print(f"{variant:11s} run {k}: job {row['job_s']:7.1f}s {row['job_fps']:7.2f} frames/s | {render}",
                      flush=True)
        ray.shutdown()
    finally:
        shutil.rmtree(work, ignore_errors=True)

    variants = list(dict.fromkeys(r["variant"] for r in rows))
    metrics = ("job_fps", "render_fps")
    med = {v: {m: float(np.median([r[m] for r in rows if r["variant"] == v])) for m in metrics
               if all(m in r for r in rows if r["variant"] == v)} for v in variants}
    print(f"\n{'variant':12s} {'job frames/s':>14s} {'render frames/s':>16s}")
    for v in variants:
        render = f"{med[v]['render_fps']:16.2f}" if "render_fps" in med[v] else f"{'-':>16s}"
        print(f"{v:12s} {med[v]['job_fps']:14.2f} {render}")
    over = {}
    ray_cli = "cli_ray" if "cli_ray" in med else f"cli_ray_x{worker_counts[0]}"
    for kind, (d, r) in (("command", ("cli_direct", ray_cli)),
                         ("command, 1 worker thread", ("cli_direct", "cli_ray_t1")),
                         ("cold", ("direct", "ray")), ("warm", ("direct_warm", "ray_warm"))):
        if d in med and r in med:
            over[kind] = {m: med[d][m] / med[r][m] - 1 for m in metrics if m in med[d] and m in med[r]}
            stage = (f", render stage {over[kind]['render_fps'] * 100:+.1f}%" if "render_fps" in over[kind] else "")
            print(f"Ray overhead, {kind}: job {over[kind]['job_fps'] * 100:+.1f}%{stage} (target <= 5%)")
    if len(worker_counts) > 1 and "cli_ray" in args.variants.split(","):
        one = med[f"cli_ray_x{worker_counts[0]}"]["job_fps"]
        over["scaling"] = {f"x{n}": med[f"cli_ray_x{n}"]["job_fps"] / one for n in worker_counts}
        print("Ray scaling (job frames/s vs " + f"{worker_counts[0]} worker): " +
              ", ".join(f"{n} workers {v:.2f}x" for n, v in zip(worker_counts, over["scaling"].values())))
    hashes = {r["frames_sha256"] for r in rows if "frames_sha256" in r}
    identical = len(hashes) == 1 if hashes else None
    if hashes:
        print(f"rendered frames identical across the fresh-process jobs: {identical}")
    starts = [r["worker_start"] for r in rows if "worker_start" in r]
    if starts:
        print("cold worker start (median s): " + ", ".join(
            f"{k} {np.median([s[k] for s in starts if k in s]):.1f}" for k in starts[0]))
    print(f"ray.init: {connect_s:.1f}s (not in the jobs)")
    seconds = print_breakdown(rows)
    info = dict(date=dt.date.today().isoformat(), device=gpu, tiny=tiny, frames=frames, batch=batch, steps=steps,
                repeat=args.repeat, torch=torch.__version__, ray=ray.__version__, python=platform.python_version(),
                host_cpus=__import__("os").cpu_count(), connect_s=connect_s, rows=rows, median=med,
                overhead=over, seconds=seconds, frames_identical=identical,
                faces="replayed (bench/replayed_faces.py)" if args.inputs else "dlib")
    final = partial.with_name(partial.name.replace(".partial", ""))
    final.write_text(json.dumps(info, indent=2))
    partial.unlink(missing_ok=True)
    print(f"wrote {final}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
