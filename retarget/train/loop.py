"""`retarget train expression|reference DATA --weights DIR -o RUN`: the accelerate training loop.

RUN/ holds:
  config.json                 mode, data, weights and every option (checked again on --resume)
  log.jsonl                   one line per optimizer step: step, loss, lr, seconds
  loss.png                    the loss curve (redrawn at each checkpoint and at the end)
  checkpoints/step-NNNNNN/    trainable.safetensors (exact tensors), optimizer.pt, state.json, and the adapter
                              at its release path (usable as it is)
  val/step-NNNNNN.png         validation renders: fixed (identity, expression) pairs, target frame beside render
  final/<release path>        the trained adapter in the release format
  weights/                    a complete weights folder: the trained adapter plus links to every other file of
                              --weights, so `retarget run --weights RUN/weights` uses it directly

Determinism: the sample at each global position and all its random draws depend only on (seed, position)
(data.SampleOrder, model.sample_generator); the optimizer state and the trainable tensors are saved exactly.
So a run interrupted at step k and resumed computes the same losses as an uninterrupted one (same machine,
same batch shapes), and N data-parallel processes of batch b see what one process of batch N * b sees.
Data parallel: `accelerate launch --num_processes N -m retarget.cli train ...` (see README, "Training").
"""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from render.errors import RetargetError
from retarget.train.options import TrainOptions

CKPT_DIR = "checkpoints"
# Options that may change on --resume (everything else must match the run being continued).
RESUMABLE = ("steps", "checkpoint_every", "keep_checkpoints", "validate", "val_count", "val_steps", "resume",
             "device")


@dataclass
class TrainResult:
    run: Path
    steps: int
    losses: list[float]
    adapter: Path
    weights: Path | None

    def line(self) -> str:
        tail = f"; use it with: retarget run --weights {self.weights}" if self.weights else ""
        return (f"trained {self.steps} steps, loss {np.mean(self.losses[:5]):.4f} (first 5) -> "
                f"{np.mean(self.losses[-5:]):.4f} (last 5); adapter {self.adapter}{tail}")


def _check_options(o: TrainOptions) -> None:
    bad = []
    if o.steps < 1:
        bad.append("--steps >= 1")
    if o.batch_size < 1 or o.grad_accum < 1:
        bad.append("--batch-size >= 1 and --grad-accum >= 1")
    if not o.lr > 0:
        bad.append("--lr > 0")
    if o.checkpoint_every < 1:
        bad.append("--checkpoint-every >= 1")
    if o.val_count < 1 or o.val_steps < 1:
        bad.append("--val-count >= 1 and --val-steps >= 1")
    if bad:
        raise RetargetError("train options: " + ", ".join(bad) + " required")
    if o.adam8bit:
        try:
            import bitsandbytes  # noqa: F401
        except ImportError:
            raise RetargetError("--adam8bit needs bitsandbytes, which is not installed: pip install bitsandbytes "
                                "(CUDA machines), or leave --adam8bit out") from None


def _accelerator(opts: TrainOptions):
    from accelerate import Accelerator

    cuda = torch.cuda.is_available() and opts.device != "cpu"
    if opts.device == "cuda" and not torch.cuda.is_available():
        raise RetargetError("--device cuda but no CUDA GPU is visible")
    mp = opts.mixed_precision
    if mp == "auto":
        mp = "fp16" if cuda else "no"
    if mp == "fp16" and not cuda:
        raise RetargetError("--mixed-precision fp16 needs a CUDA GPU; use bf16 or no on the CPU")
    return Accelerator(mixed_precision=mp, cpu=not cuda)


def _optimizer(params, opts: TrainOptions):
    if opts.adam8bit:
        import bitsandbytes as bnb

        return bnb.optim.AdamW8bit(params, lr=opts.lr, weight_decay=opts.weight_decay)
    return torch.optim.AdamW(params, lr=opts.lr, weight_decay=opts.weight_decay)


def prepare_model(model, accelerator, opts: TrainOptions):
    """Put `model` (a TrainingModel) on the accelerator's device: frozen weights in the half type under mixed
    precision (the trained tensors stay fp32, autocast does the rest), gradient checkpointing if asked, the
    optimizer; `accelerator.prepare` wraps the UNet (DDP under data parallel). Returns (unet, optimizer, params)."""
    pipe = model.pipe
    pipe.to(accelerator.device)
    if accelerator.mixed_precision in ("fp16", "bf16"):
        half = torch.float16 if accelerator.mixed_precision == "fp16" else torch.bfloat16
        trainable = {id(p) for p in model.params.values()}
        for module in (pipe.unet, pipe.vae, pipe.text_encoder):
            for p in module.parameters():
                if id(p) not in trainable:
                    p.data = p.data.to(half)
    if opts.gradient_checkpointing:
        pipe.unet.enable_gradient_checkpointing()
    pipe.unet.train()
    params = list(model.params.values())
    optimizer = _optimizer(params, opts)
    unet, optimizer = accelerator.prepare(pipe.unet, optimizer)
    return unet, optimizer, params


def train_step(accelerator, unet, objective, optimizer, params, batch_for: Callable[[int], dict], grad_accum: int,
               max_grad_norm: float) -> float:
    """One optimizer step over `grad_accum` micro-batches (`batch_for(i)`, i = 0..grad_accum-1; gradients
    synchronised across processes on the last one only), clipped to `max_grad_norm` (0: no clipping).
    Returns the mean loss of the micro-batches, averaged over processes."""
    total = 0.0
    for micro in range(grad_accum):
        batch = batch_for(micro)
        last = micro == grad_accum - 1
        ctx = accelerator.no_sync(unet) if (not last and accelerator.num_processes > 1) else _null()
        with ctx, accelerator.autocast():
            total += objective.forward_backward(batch, unet, backward=accelerator.backward, scale=1.0 / grad_accum)
    if max_grad_norm > 0:
        accelerator.clip_grad_norm_(params, max_grad_norm)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    loss = total / grad_accum
    if accelerator.num_processes > 1:
        loss = float(accelerator.reduce(torch.tensor(loss, device=accelerator.device), "mean"))
    return loss


def _lr(opts: TrainOptions, step: int) -> float:
    return opts.lr * min(1.0, (step + 1) / opts.lr_warmup) if opts.lr_warmup > 0 else opts.lr


def _checkpoints(run: Path) -> list[tuple[int, Path]]:
    d = run / CKPT_DIR
    if not d.is_dir():
        return []
    out = []
    for p in d.iterdir():
        if p.name.startswith("step-") and (p / "state.json").is_file():
            try:
                out.append((int(p.name[5:]), p))
            except ValueError:
                continue
    return sorted(out)


def _write_json(path: Path, obj) -> None:
    from render.files import atomic_open

    with atomic_open(path, "w") as f:
        json.dump(obj, f, indent=1)


def _plot(run: Path, losses: list[float]) -> None:
    from render.plot import plot_loss

    plot_loss(losses, run / "loss.png", title=f"training loss ({run.name})")


def _save_checkpoint(run: Path, step: int, model, optimizer, losses: list[float], config: dict,
                     keep: int, scaler=None) -> Path:
    """Write checkpoints/step-NNNNNN/ (in a temporary folder first, renamed when complete)."""
    from safetensors.torch import save_file

    final = run / CKPT_DIR / f"step-{step:06d}"
    tmp = run / CKPT_DIR / f".step-{step:06d}.partial"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file({k: v.detach().float().cpu().contiguous() for k, v in model.params.items()},
              str(tmp / "trainable.safetensors"))
    torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
    state = {"step": step, "losses": losses, "config": config}
    if scaler is not None:
        torch.save(scaler.state_dict(), tmp / "scaler.pt")
    model.save_adapter(tmp)
    (tmp / "state.json").write_text(json.dumps(state))
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    if keep > 0:
        for _, old in _checkpoints(run)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    return final


def _load_checkpoint(ckpt: Path, model, optimizer, scaler=None) -> tuple[int, list[float]]:
    from safetensors.torch import load_file

    saved = load_file(str(ckpt / "trainable.safetensors"))
    if set(saved) != set(model.params):
        raise RetargetError(f"{ckpt}: its trainable tensors do not match this model (other weights or mode?)")
    with torch.no_grad():
        for k, p in model.params.items():
            p.copy_(saved[k].to(p.device, p.dtype))
    optimizer.load_state_dict(torch.load(ckpt / "optimizer.pt", map_location="cpu", weights_only=False))
    if scaler is not None and (ckpt / "scaler.pt").is_file():
        scaler.load_state_dict(torch.load(ckpt / "scaler.pt", weights_only=False))
    state = json.loads((ckpt / "state.json").read_text())
    return int(state["step"]), [float(x) for x in state["losses"]]


def _prepare_run(run: Path, config: dict, opts: TrainOptions) -> Path | None:
    """Check -o / --resume before any expensive work. Returns the checkpoint to resume from, or None."""
    cfg_path = run / "config.json"
    if not opts.resume:
        if run.exists() and (not run.is_dir() or any(run.iterdir())):
            raise RetargetError(f"run folder {run} already exists and is not empty; use --resume to continue it "
                                "or choose a new -o folder")
        return None
    if not cfg_path.is_file():
        raise RetargetError(f"--resume: {run} holds no training run (no config.json)")
    old = json.loads(cfg_path.read_text())
    diff = [k for k in config if k not in RESUMABLE and old.get(k) != config[k]]
    if diff:
        shown = ", ".join(f"{k}: {old.get(k)!r} -> {config[k]!r}" for k in diff[:4])
        raise RetargetError(f"--resume: {run} was trained with other settings ({shown}); resume with the same ones")
    ckpts = _checkpoints(run)
    if ckpts and ckpts[-1][0] >= opts.steps:
        raise RetargetError(f"--resume: {run} is already at step {ckpts[-1][0]}; raise --steps to train further")
    return ckpts[-1][1] if ckpts else None


def _weights_view(run: Path, base_root: Path, adapter_rel: str) -> Path | None:
    """RUN/weights: links to every top-level entry of the base weights folder except the trained adapter's
    folder, which holds the trained file. None when the file system refuses links."""
    view = run / "weights"
    shutil.rmtree(view, ignore_errors=True)
    view.mkdir()
    top = adapter_rel.split("/")[0]
    try:
        for entry in sorted(base_root.iterdir()):
            if entry.name != top and not entry.name.startswith("."):
                os.symlink(entry.resolve(), view / entry.name, target_is_directory=entry.is_dir())
    except OSError:
        shutil.rmtree(view, ignore_errors=True)
        return None
    (view / top).mkdir()
    shutil.copy2(run / "final" / adapter_rel, view / adapter_rel)
    return view


def train(mode: str, data_dir: str | os.PathLike, output: str | os.PathLike, opts: TrainOptions | None = None, *,
          weights=None, on_step: Callable[[int, float], None] | None = None, progress: bool = True) -> TrainResult:
    """Train the Expression Adapter (mode "expression") or the Reference Adapter ("reference") on the dataset
    folder `data_dir`, starting from the weights at `weights`; write the run folder `output` (see the module
    docstring). on_step(step, loss) is called after every optimizer step (step counts from 1). Returns the
    TrainResult. Ctrl-C saves a checkpoint at the last finished step before stopping (then --resume)."""
    from tqdm import tqdm

    from retarget.train import data as datamod
    from retarget.train import validation
    from retarget.train.model import MODES, Objective, build_training_pipeline, collate
    from retarget.weights import WeightsLayout

    opts = opts or TrainOptions()
    if mode not in MODES:
        raise RetargetError(f"training mode must be one of {', '.join(MODES)}, got {mode!r}")
    _check_options(opts)
    run = Path(output)
    dataset = datamod.TrainData(data_dir)
    n = len(dataset) if mode == "expression" else len(dataset.pairs)
    if n == 0:
        raise RetargetError(f"{data_dir} holds no Reference Adapter pairs (frames of one video with different "
                            "expressions); add videos to the dataset")
    layout = weights if isinstance(weights, WeightsLayout) else WeightsLayout(weights)
    config = {"mode": mode, "data": str(Path(data_dir).resolve()), "weights": str(Path(layout.root).resolve()),
              **asdict(opts)}
    ckpt = _prepare_run(run, config, opts)

    accelerator = _accelerator(opts)
    main = accelerator.is_main_process
    model = build_training_pipeline(layout, mode, init=opts.init, rank=opts.rank, lora_targets=opts.lora_targets,
                                    seed=opts.seed)
    pipe = model.pipe
    unet, optimizer, params = prepare_model(model, accelerator, opts)
    objective = Objective(model, seed=opts.seed, drop_identity=opts.drop_identity,
                          drop_expression=opts.drop_expression, drop_reference=opts.drop_reference)
    scaler = getattr(accelerator, "scaler", None)

    start, losses = 0, []
    if ckpt is not None:
        start, losses = _load_checkpoint(ckpt, model, optimizer, scaler)
    if main:
        run.mkdir(parents=True, exist_ok=True)
        (run / CKPT_DIR).mkdir(exist_ok=True)
        _write_json(run / "config.json", config)
        with open(run / "log.jsonl", "w") as f:  # the log of the steps kept: the checkpoint's
            for i, loss in enumerate(losses):
                f.write(json.dumps({"step": i + 1, "loss": loss}) + "\n")
    val_set = validation.choose(dataset, mode, opts.val_count) if opts.validate else None
    order = datamod.SampleOrder(n, opts.seed)
    world, rank = accelerator.num_processes, accelerator.process_index
    saved_at = start

    def load(micro_step: int) -> dict:
        pos = datamod.positions(micro_step, opts.batch_size, world, rank)
        return collate(dataset, mode, [order(p) for p in pos], pos)

    loader = Prefetch(load, last=opts.steps * opts.grad_accum)

    def checkpoint(step: int) -> None:
        nonlocal saved_at
        if main:
            _save_checkpoint(run, step, model, optimizer, losses, config, opts.keep_checkpoints, scaler)
            _plot(run, losses)
            if val_set is not None:
                with accelerator.autocast():
                    validation.render(model, dataset, val_set, run / "val" / f"step-{step:06d}.png",
                                      steps=opts.val_steps, title=f"{mode} adapter, step {step}")
                model.set_train_state()
                pipe.unet.train()
        saved_at = step

    bar = tqdm(total=opts.steps, initial=start, unit="step", disable=not (progress and main))
    step = start
    log = open(run / "log.jsonl", "a") if main else None
    try:
        for step in range(start, opts.steps):
            t0 = time.perf_counter()
            lr = _lr(opts, step)
            for g in optimizer.param_groups:
                g["lr"] = lr

            loss = train_step(accelerator, unet, objective, optimizer, params,
                              lambda micro: loader.get(step * opts.grad_accum + micro), opts.grad_accum,
                              opts.max_grad_norm)
            losses.append(loss)
            if log:
                log.write(json.dumps({"step": step + 1, "loss": loss, "lr": lr,
                                      "seconds": round(time.perf_counter() - t0, 4)}) + "\n")
                log.flush()
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.4f}")
            if (step + 1) % opts.checkpoint_every == 0 and step + 1 < opts.steps:
                checkpoint(step + 1)
                accelerator.wait_for_everyone()
            if on_step is not None:
                on_step(step + 1, loss)
    except KeyboardInterrupt:
        done = len(losses)
        if main and done > saved_at:
            # The optimizer has stepped `done` times; grads of an unfinished step are dropped.
            _save_checkpoint(run, done, model, optimizer, losses, config, opts.keep_checkpoints, scaler)
            _plot(run, losses)
            print(f"\ninterrupted: checkpoint saved at step {done} in {run / CKPT_DIR}; continue with --resume")
        raise
    finally:
        loader.close()
        bar.close()
        if log:
            log.close()

    result_adapter, view = None, None
    if main:
        checkpoint(opts.steps)
        rel = model.save_adapter(run / "final")
        result_adapter = run / "final" / rel
        view = _weights_view(run, Path(layout.root), rel)
    accelerator.wait_for_everyone()
    dataset.close()
    return TrainResult(run, opts.steps, losses, result_adapter, view)


class Prefetch:
    """`get(i)` returns `fn(i)`, with fn(i + 1) .. fn(i + depth) already being computed on one background thread
    (PNG decoding and resizing release the GIL, so loading overlaps the GPU). Results depend only on i, so
    prefetching changes nothing but the timing. Indices >= `last` are never prefetched."""

    def __init__(self, fn: Callable[[int], dict], depth: int = 2, last: int | None = None):
        from concurrent.futures import ThreadPoolExecutor

        self.fn, self.depth, self.last = fn, depth, last
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="retarget-data")
        self.futures: dict = {}

    def get(self, i: int) -> dict:
        for j in range(i, i + self.depth + 1):
            if j not in self.futures and (self.last is None or j < self.last or j == i):
                self.futures[j] = self.pool.submit(self.fn, j)
        for j in [k for k in self.futures if k < i]:  # out of order (a resume): drop stale work
            self.futures.pop(j).cancel()
        return self.futures.pop(i).result()

    def close(self) -> None:
        for f in self.futures.values():
            f.cancel()
        self.pool.shutdown(wait=True)
        self.futures = {}


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False
