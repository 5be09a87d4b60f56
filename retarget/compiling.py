"""Compile where it pays: whether a job runs the UNet and the VAE decoder through `torch.compile`, the
persistent compile cache, and the padded last batch that lets one compiled shape serve a whole video.

- `choose(...)`: the `--compile auto|on|off` decision for the UNet (a pure function): auto compiles when
  the job's estimated saving, frames x (eager - compiled) seconds a frame from `SPEED`, exceeds the
  compile cost (`COMPILE_S`, cold or warm as the cache holds this shape or not). Never on the CPU.
  `choose_decoder(...)`: the same for the VAE decoder (`DECODER`, `DECODER_COMPILE_S`): it costs a
  fifth of the UNet's compile and saves about half of the decode, so it pays for far shorter jobs;
  `on` and `off` set both.
- `CompileCache`: the folder (`cache_folder()`: $RETARGET_COMPILE_CACHE, else
  platformdirs.user_cache_dir("retarget")/compile) holding inductor's FX graph and autotune caches
  (`inductor/`), torch's portable cache artifacts per shape (`artifacts/<key>.bin`, copy them to another
  machine's folder to start warm there) and `index.json` (shapes compiled here, with compile seconds).
  A corrupt file never breaks a run: it is dropped with a warning and the UNet compiles fresh.
- `CompiledBatches`: with the UNet compiled, renders each batch of frame indices padded to the job's
  batch size (`pad_indices`), so the last, shorter batch of a video reuses the compiled shape; the extra
  rows are dropped. The decoder pads its own last chunk (`RetargetPipeline.decode`).

Padding is exact where it must be: with per-frame noise a frame's noise depends only on (seed, frame
index), and the padding rows repeat the last real frame's index and parameters, so every real row draws
the noise it draws unpadded; rows of a batch never mix (per-row attention and group norm), so the real
frames change only by the rounding of other GEMM shapes (fp32 ~1e-6). run.py aligns batches to
multiples of the batch size, so a resumed job renders the same padded batches as an uninterrupted one;
the work folder's manifest records `compiled`, and `--compile auto` follows it on `--resume`.

Imports: torch lazily; `retarget.oom` (split_on_oom, is_oom) lazily; render.files for atomic writes.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import shutil
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

ENV = "RETARGET_COMPILE_CACHE"
SETTINGS = ("auto", "on", "off")
TORCH_MODE = "reduce-overhead"  # CUDA graphs: the CPU leaves the loop (bench/NOTES.md)

# Seconds per frame eager vs compiled (mode "reduce-overhead"), by frames per call, at the mode's
# reference steps: H100 80GB HBM3, fp16, 512 px, full-size random weights, bench/pipeline.py,
# bench/results/pipeline_NVIDIA_H100_80GB_HBM3_2026-11-24_speed.json and _speed2.json (README, Speed):
# quality = DPM++ 25 steps + CFG + reference bank, 0.69 / 4.75 / 5.20 frames/s eager and
# 3.72 / 6.37 / 6.69 compiled at B = 1 / 8 / 32. Fast (LCM 4 steps + reference): eager 4.89 / 17.0 /
# 25.3 frames/s measured. Its compiled column at B=32 is the measured ratio: H200, B=32, 31.8 -> 30.6
# ms/frame (x1.04; bench/results/compile_NVIDIA_H200_2026-12-03_fast.json) applied to the H100's eager
# figure; at B = 1 and 8 it is still an ESTIMATE (quality's compiled/eager ratio at each B, the VAE
# decode kept), not measured.
SPEED = {
    "quality": {"steps": 25, "rows": {1: (1.449, 0.269), 8: (0.2105, 0.157), 32: (0.1923, 0.1495)}},
    "fast": {"steps": 4, "rows": {1: (0.2045, 0.045), 8: (0.0588, 0.044), 32: (0.0395, 0.0380)}},
}
# Compile seconds of one shape. Cold (empty cache): 70-85 s on the H100 (bench/NOTES.md), the worst
# taken. Warm (this shape in the cache): H200, quality mode, B=32 (2026-12-03,
# bench/results/compile_NVIDIA_H200_2026-12-03_warm.json): cold 53.1 s, warm 14.0 s, portable artifacts
# in a new folder 14.3 s (earlier cold runs: 60.8 s, 62.4 s); 15 s taken. The measured time of this
# machine's last compile of the shape (index.json) replaces it once known.
COMPILE_S = {"cold": 85.0, "warm": 15.0}
# The VAE decoder, seconds a frame eager vs compiled (inductor, mode "default", chunks of 16 frames):
# H200, fp16, 512 px, bench/results/fast_mode_NVIDIA_H200_2026-12-04.json: 13.2 -> 6.4 ms (the same
# absolute saving in both modes: the decode does not depend on the steps). Compile seconds: cold 19.0 s
# measured there, 25 taken. Warm not measured alone: with the UNet (bench/compile.py --decoder,
# compile_NVIDIA_H200_2026-12-04_decoder.json) warm 14.7 s against 12.0 s for the UNet alone the day
# before (portable 11.8 vs 9.8), so ~2-3 s; 8 taken until measured.
DECODER = {"eager": 0.0132, "compiled": 0.0064}
DECODER_COMPILE_S = {"cold": 25.0, "warm": 8.0}
DECODE_CHUNK = 16  # retarget.pipeline.DECODE_BATCH (not imported: that would load diffusers here)
DECODER_MODE = "default"  # large kernels: CUDA graphs would add memory and little speed


# --------------------------------------------------------------------------- the decision

@dataclass(frozen=True)
class CompileChoice:
    """on: compile the UNet for this job. note: one short clause for the summary line ("" = nothing to
    say, e.g. on the CPU with auto). saving_s / cost_s: the estimate behind auto (None when not made)."""

    on: bool
    note: str
    saving_s: float | None = None
    cost_s: float | None = None


def job_mode(call: dict) -> str:
    """"fast" for the LCM scheduler, else "quality" (the keys of SPEED)."""
    return "fast" if call.get("scheduler") == "lcm" else "quality"


def seconds_per_frame(mode: str, batch: int, steps: int, cfg: bool = True) -> tuple[float, float]:
    """(eager, compiled) seconds a frame for `mode` at `batch` frames a call and `steps` steps, from SPEED:
    the row of the largest measured batch <= `batch`, scaled by steps / the mode's steps (the UNet
    dominates), halved for quality without CFG (half the rows)."""
    table = SPEED[mode]
    b = max([k for k in table["rows"] if k <= max(1, batch)] or [min(table["rows"])])
    eager, compiled = table["rows"][b]
    scale = steps / table["steps"] * (0.5 if mode == "quality" and not cfg else 1.0)
    return eager * scale, compiled * scale


def choose(setting: str, *, device: str, mode: str, frames: int, batch: int, steps: int, cfg: bool = True,
           warm: bool = False, warm_s: float | None = None, remote: bool = False,
           previous: bool | None = None) -> CompileChoice:
    """Whether a job compiles (pure: no torch, no files).

    setting: "auto" | "on" | "off"; device: "cuda" | "cpu"; mode: "quality" | "fast"; frames: frames to
    render; batch: frames per call (the compiled shape; padded batches render `ceil(frames / batch) *
    batch` rows); steps, cfg: the call's; warm: the cache holds this shape (cost COMPILE_S["warm"], or
    `warm_s`, this machine's last measured compile of it); remote: frames render on Ray workers (eager);
    previous: a resumed work folder's choice, which auto follows (the same frames as an uninterrupted run).
    """
    if setting not in SETTINGS:
        from render.errors import RetargetError

        raise RetargetError(f"--compile: choose one of {', '.join(SETTINGS)}, got {setting!r}")
    if device != "cuda":
        return CompileChoice(False, "eager (--compile on: no GPU; compiling pays only there)" if setting == "on" else "")
    if remote:
        return CompileChoice(False, "eager (Ray workers render eagerly)" if setting == "on" else "")
    if setting == "off":
        return CompileChoice(False, "eager (--compile off)")
    if setting == "on":
        return CompileChoice(True, "compiled (--compile on)")
    if previous is not None:
        return CompileChoice(bool(previous), f"{'compiled' if previous else 'eager'} (auto: as the resumed work folder)")
    eager, compiled = seconds_per_frame(mode, batch, steps, cfg)
    padded = math.ceil(frames / max(1, batch)) * max(1, batch)
    saving = frames * eager - padded * compiled
    cost = compile_cost(COMPILE_S, warm, warm_s)
    cache = "cached" if warm else "cold"
    if frames <= 2:
        return CompileChoice(False, f"eager (auto: compile cannot pay for {frames} frame{'s' * (frames != 1)})",
                             saving, cost)
    if saving > cost:
        return CompileChoice(True, f"compiled (auto: ~{saving:.0f} s saved for ~{cost:.0f} s {cache} compile)",
                             saving, cost)
    return CompileChoice(False, f"eager (auto: compile would not pay for {frames} frames: "
                                f"~{max(saving, 0):.0f} s saved for ~{cost:.0f} s {cache} compile)", saving, cost)


def compile_cost(table: dict, warm: bool, warm_s: float | None) -> float:
    """Seconds a compile is counted at: `table`'s "cold", or when warm this machine's measured `warm_s`,
    else `table`'s "warm" (COMPILE_S, DECODER_COMPILE_S)."""
    return (warm_s if warm_s is not None else table["warm"]) if warm else table["cold"]


def choose_decoder(setting: str, *, device: str, frames: int, warm: bool = False, warm_s: float | None = None,
                   remote: bool = False, previous: bool | None = None) -> CompileChoice:
    """Whether a job compiles the VAE decoder (pure; arguments as `choose`'s). The saving is frames x
    (DECODER eager - compiled) whatever the mode; its note is the clause after "VAE decoder "."""
    if setting != "auto" or device != "cuda" or remote:
        on = setting == "on" and device == "cuda" and not remote
        return CompileChoice(on, "")  # `choose` says it for both (or nothing, on the CPU)
    if previous is not None:
        return CompileChoice(bool(previous), f"{'compiled' if previous else 'eager'} (auto: as the resumed work folder)")
    saving = frames * (DECODER["eager"] - DECODER["compiled"])
    cost = compile_cost(DECODER_COMPILE_S, warm, warm_s)
    cache = "cached" if warm else "cold"
    if saving > cost:
        return CompileChoice(True, f"compiled (auto: ~{saving:.0f} s saved for ~{cost:.0f} s {cache} compile)", saving, cost)
    return CompileChoice(False, f"eager (auto: ~{max(saving, 0):.0f} s saved for ~{cost:.0f} s {cache} compile)",
                         saving, cost)


MANIFEST_KEYS = {"unet": "compiled", "decoder": "decoder_compiled"}  # the work folder's record of each part


def previous_choice(manifest: Path, part: str = "unet") -> bool | None:
    """The choice for `part` ("unet" or "decoder") recorded in a work folder's manifest (False when it
    has none: made eagerly), None when there is no readable manifest."""
    try:
        return bool(json.loads(Path(manifest).read_text()).get(MANIFEST_KEYS[part], False))
    except (OSError, ValueError, AttributeError):
        return None


# --------------------------------------------------------------------------- the cache

def cache_folder() -> Path:
    """$RETARGET_COMPILE_CACHE, else platformdirs.user_cache_dir("retarget")/compile."""
    env = os.environ.get(ENV)
    if env:
        return Path(env).expanduser()
    from platformdirs import user_cache_dir

    return Path(user_cache_dir("retarget")) / "compile"


def shape_key(*, torch_version: str, gpu: str, dtype: str, batch: int, call: dict, image_size: int,
              mode: str = TORCH_MODE) -> str:
    """A file-name-safe key for one compiled shape: what makes torch compile again (torch version, GPU,
    dtype, rows per UNet call, image size, the reference on or off, compile mode) and the scheduler."""
    cfg = float(call.get("guidance", 1.0)) > 1.0
    parts = dict(torch=torch_version, gpu=gpu, dtype=str(dtype).replace("torch.", ""), batch=int(batch),
                 rows=int(batch) * (2 if cfg else 1), scheduler=call.get("scheduler", "dpm++"),
                 reference=float(call.get("ref_strength", 0.0)) > 0, image=int(image_size), mode=mode)
    return _key(parts, f"{parts['scheduler']}-b{batch}-{parts['dtype']}-{gpu}")


def _key(parts: dict, readable: str) -> str:
    """`readable` made file-name-safe, then a digest of everything in `parts`."""
    digest = hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:12]
    return f"{re.sub(r'[^A-Za-z0-9]+', '-', readable).strip('-')}-{digest}"


def decode_rows(batch: int) -> int:
    """Frames per compiled decoder call for a job of `batch` frames per batch: the pipeline's decode chunk
    (16), or the batch when smaller (padding 8 rows to 16 would double the decode)."""
    return max(1, min(int(batch), DECODE_CHUNK))


def decoder_key(*, torch_version: str, gpu: str, dtype: str, chunk: int, image_size: int) -> str:
    """`shape_key`'s counterpart for the compiled VAE decoder: its shape is the decode chunk and the image."""
    parts = dict(torch=torch_version, gpu=gpu, dtype=str(dtype).replace("torch.", ""), chunk=int(chunk),
                 image=int(image_size), mode=DECODER_MODE, part="decoder")
    return _key(parts, f"decoder-c{chunk}-{parts['dtype']}-{gpu}")


class CompileCache:
    """The compile folder (module docstring). Every read survives a corrupt file: a warning, then the
    file is treated as absent (and replaced by the next write)."""

    def __init__(self, folder: str | os.PathLike | None = None):
        self.folder = Path(folder) if folder is not None else cache_folder()
        self.inductor = self.folder / "inductor"
        self.artifacts = self.folder / "artifacts"
        self.index_path = self.folder / "index.json"

    def configure(self) -> None:
        """Point inductor's caches (FX graph cache, autotune cache, Triton kernels) into `inductor/`;
        call before compiling. The folders are made here."""
        import torch._inductor.config as inductor_config

        self.inductor.mkdir(parents=True, exist_ok=True)
        self.artifacts.mkdir(parents=True, exist_ok=True)
        if os.environ.get("TORCHINDUCTOR_CACHE_DIR") != str(self.inductor):
            os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(self.inductor)
            try:  # functions memoised on the old folder (a compile earlier in this process)
                from torch._inductor.utils import clear_caches

                clear_caches()
            except Exception:  # noqa: BLE001 - an older torch; nothing was memoised then
                pass
        inductor_config.fx_graph_cache = True
        inductor_config.autotune_local_cache = True

    def index(self) -> dict:
        """{key: {"date": ISO date, "cold_s"/"warm_s": measured compile seconds}} of the shapes compiled here."""
        try:
            data = json.loads(self.index_path.read_text())
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as e:
            warnings.warn(f"compile cache index {self.index_path} is unreadable ({type(e).__name__}); "
                          "starting a new one", stacklevel=2)
            return {}
        return data if isinstance(data, dict) else {}

    def has(self, key: str) -> bool:
        """Whether this shape was compiled here (or its portable artifacts are here)."""
        return key in self.index() or self.artifact_path(key).is_file()

    def measured_s(self, key: str) -> float | None:
        """This folder's last measured warm compile of `key` in seconds (None: not measured)."""
        entry = self.index().get(key)
        s = entry.get("warm_s") if isinstance(entry, dict) else None
        return float(s) if isinstance(s, (int, float)) and math.isfinite(s) and s >= 0 else None

    def record(self, key: str, **seconds: float) -> None:
        """Note that `key` compiled here, with its measured `cold_s` / `warm_s` compile seconds if given."""
        import datetime as dt

        from render.files import atomic_open

        index = self.index()
        entry = dict(index.get(key)) if isinstance(index.get(key), dict) else {}
        entry.update(seconds, date=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"))
        index[key] = entry
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            with atomic_open(self.index_path, "w") as f:
                f.write(json.dumps(index, indent=1, sort_keys=True))
        except Exception as e:  # noqa: BLE001 - a cache must never fail the job
            warnings.warn(f"could not write the compile cache index {self.index_path}: {e}", stacklevel=2)

    def artifact_path(self, key: str) -> Path:
        return self.artifacts / f"{key}.bin"

    def load_artifacts(self, key: str) -> bool:
        """Hot-load the portable artifacts of `key` into torch's caches (when this folder's own inductor
        cache has not compiled it). True when loaded; a corrupt file is removed with a warning."""
        import torch

        path = self.artifact_path(key)
        if key in self.index() or not path.is_file():
            return False
        try:
            # None: torch could not read it (it logs why: a checksum, a version mismatch)
            why = None if torch.compiler.load_cache_artifacts(path.read_bytes()) is not None else "unreadable"
        except Exception as e:  # noqa: BLE001 - unpickling garbage raises anything
            why = type(e).__name__
        if why is None:
            return True
        warnings.warn(f"compile cache file {path} is corrupt ({why}); removed it, compiling fresh", stacklevel=2)
        path.unlink(missing_ok=True)
        return False

    def save_artifacts(self, key: str) -> Path | None:
        """Write torch's portable artifacts of this process's compiles as `artifacts/<key>.bin`."""
        import torch

        from render.files import atomic_open

        try:
            got = torch.compiler.save_cache_artifacts()
            if not got:
                return None
            self.artifacts.mkdir(parents=True, exist_ok=True)
            path = self.artifact_path(key)
            with atomic_open(path, "wb") as f:
                f.write(got[0])
            return path
        except Exception as e:  # noqa: BLE001 - a cache must never fail the job
            warnings.warn(f"could not save the portable compile cache for {key}: {e}", stacklevel=2)
            return None

    def reset_inductor(self) -> None:
        """Delete inductor's cache folder (after a compile failed on it) and forget this process's
        compiled code, so that the next call compiles fresh."""
        import torch

        shutil.rmtree(self.inductor, ignore_errors=True)
        self.inductor.mkdir(parents=True, exist_ok=True)
        torch._dynamo.reset()
        try:
            from torch._inductor.utils import clear_caches

            clear_caches()
        except Exception:  # noqa: BLE001
            pass


# --------------------------------------------------------------------------- padded batches

def pad_indices(idx: list[int], batch: int) -> list[int]:
    """`idx` followed by copies of its last index up to `batch` entries (unchanged when already as long)."""
    idx = [int(i) for i in idx]
    return idx + [idx[-1]] * max(0, batch - len(idx)) if idx else idx


class CompiledBatches:
    """Runs a job's batches through the pipeline's compiled UNet and/or VAE decoder. With the UNet
    (`unet`), each batch is padded to `batch` rows (one compiled shape for the whole video), the extra
    outputs dropped; the decoder alone (`decoder` without `unet`) needs no padded batches (the decode pads
    its last chunk). The first call compiles; if it fails (a corrupt inductor cache, a compiler bug) the
    inductor cache is cleared and it compiles fresh once, and if that fails too the job goes on eagerly;
    a warning says so either way, and `note` changes.

    pipe: a RetargetPipeline; key: `shape_key(...)` (the UNet's; the decoder's `decoder_key` when only the
    decoder compiles); also: further keys compiled with it (the decoder's beside the UNet's), recorded in
    the cache's index too; cache: CompileCache; backend / mode: torch.compile's (tests use a cheap
    backend on the CPU)."""

    def __init__(self, pipe, batch: int, key: str, cache: CompileCache, *, log: Callable[[str], None] = print,
                 note: str = "", backend: str | Callable = "inductor", mode: str | None = TORCH_MODE,
                 unet: bool = True, decoder: bool = False, also: tuple[str, ...] = ()):
        self.pipe, self.batch, self.key, self.cache, self.log = pipe, int(batch), key, cache, log
        self.note, self.backend, self.mode = note, backend, mode
        self.unet, self.decoder, self.also = bool(unet), bool(decoder), tuple(also)
        self.calls = 0
        self.failed = False
        self._first_s: float | None = None
        self._warm = cache.has(key)

    def enable(self) -> None:
        """Set up the cache and wrap the UNet and/or the decoder (lazy: torch compiles on the first call)."""
        self.cache.configure()
        loaded = self.cache.load_artifacts(self.key)
        inductor = self.backend == "inductor"
        # torch.compile hands `mode` to inductor only; other backends take none ("default")
        if self.unet:
            self.pipe.compile_unet(self.mode if inductor else "default", backend=self.backend, dynamic=False)
        if self.decoder:
            self.pipe.compile_decoder(DECODER_MODE if inductor else "default", rows=decode_rows(self.batch),
                                      backend=self.backend, dynamic=False)
        state = "portable cache loaded" if loaded else ("cached" if self._warm else "cold cache")
        what = " and ".join(([f"the UNet for batches of {self.batch} frames"] if self.unet else [])
                            + (["the VAE decoder"] if self.decoder else []))
        self.log(f"compiling {what} ({state}); the first batch waits for it")

    def disable(self) -> None:
        if self.unet:
            self.pipe.compile_unet(None)
        if self.decoder:
            self.pipe.compile_decoder(None)

    def render(self, render: Callable[[list[int]], list[np.ndarray]], idx: list[int], fit=None) -> list[np.ndarray]:
        """One image per index of `idx` (at most `batch` of them); render(indices) -> images renders a
        list of indices (with frame_indices = the indices, so the padding rows draw the last frame's noise).
        fit: retarget.oom.FitSize for the decoder alone (unpadded batches may stay split after an
        out-of-memory); the padded UNet shape is kept whole."""
        from render.errors import RetargetError
        from retarget.oom import is_oom, split_on_oom

        if self.failed:
            return split_on_oom(render, list(idx), fit)
        padded = pad_indices(list(idx), self.batch) if self.unet else list(idx)
        t0 = time.perf_counter()
        failure = None
        try:
            images = split_on_oom(render, padded, None if self.unet else fit)
        except RetargetError:
            raise
        except Exception as e:  # noqa: BLE001 - the compiler's errors have no common type
            if self.calls or is_oom(e):
                raise
            failure = f"{type(e).__name__}: {str(e)[:200]}"
        if failure is not None:  # recovered out of the except block: its traceback holds the failed call's tensors
            images = self._recover(render, padded, failure)
        self._after(time.perf_counter() - t0)
        return images[:len(idx)]

    def _recover(self, render, padded, failure: str):
        from render.errors import RetargetError
        from retarget.oom import is_oom, split_on_oom

        warnings.warn(f"torch.compile failed ({failure}); cleared the "
                      f"compile cache {self.cache.inductor} and compiling fresh", stacklevel=3)
        self.cache.reset_inductor()
        self.enable()
        again = None
        try:
            return split_on_oom(render, padded)
        except Exception as e:  # noqa: BLE001
            if isinstance(e, RetargetError) or is_oom(e):
                raise
            again = type(e).__name__
        warnings.warn(f"torch.compile failed again ({again}); rendering eagerly", stacklevel=3)
        self.disable()
        self.failed = True
        self.note = "eager (compile failed; see the warning)"
        return split_on_oom(render, padded)

    def _after(self, seconds: float) -> None:
        self.calls += 1
        if self.failed:
            return
        if self.calls == 1:
            self._first_s = seconds
            if not self._warm:
                self.cache.save_artifacts(self.key)
            for key in (self.key, *self.also):
                self.cache.record(key)
        elif self.calls == 2 and self._first_s is not None:
            # compile time = the first call's extra over a steady one (every call has the padded shape)
            self.cache.record(self.key, **{"warm_s" if self._warm else "cold_s": max(0.0, self._first_s - seconds)})


def setup(r, setting: str, *, frames: int, batch: int, log: Callable[[str], None] = print,
          previous: bool | None = None, previous_decoder: bool | None = None,
          cache: CompileCache | None = None) -> CompileChoice:
    """Decide for the job rendered by `r` (a retarget.run.Rendering) and set it up: `r.compiled` gets a
    CompiledBatches (or None: eager, the pipeline's compiled UNet and decoder undone), `r.compile_note`
    the clause. previous / previous_decoder: a resumed work folder's choices (`previous_choice`).
    Returns the UNet's choice; the decoder's is in `r.compiled.decoder` and the note."""
    call = r.call
    remote = r.render_batches is not None or r.pipe is None
    key = dkey = None
    warm, warm_s, dwarm, dwarm_s = False, None, False, None
    if r.device == "cuda" and not remote and setting != "off":  # the only case that can compile
        import torch

        cache = cache or CompileCache()
        ident = dict(torch_version=torch.__version__, gpu=torch.cuda.get_device_name(), dtype=str(r.dtype))
        key = shape_key(**ident, batch=batch, call=call, image_size=r.pipe.image_size)
        dkey = decoder_key(**ident, chunk=decode_rows(batch), image_size=r.pipe.image_size)
        warm, warm_s = cache.has(key), cache.measured_s(key)
        dwarm, dwarm_s = cache.has(dkey), cache.measured_s(dkey)
    choice = choose(setting, device=r.device, mode=job_mode(call), frames=frames, batch=batch,
                    steps=int(call.get("steps", 25)), cfg=float(call.get("guidance", 1.0)) > 1.0, warm=warm,
                    warm_s=warm_s, remote=remote, previous=previous)
    dec = choose_decoder(setting, device=r.device, frames=frames, warm=dwarm, warm_s=dwarm_s, remote=remote,
                         previous=previous_decoder)
    r.compile_note = choice.note + (f"; VAE decoder {dec.note}" if dec.note else "")
    if choice.on or dec.on:
        main, also = (key, (dkey,) if dec.on else ()) if choice.on else (dkey, ())
        r.compiled = CompiledBatches(r.pipe, batch, main, cache, log=log, note=r.compile_note,
                                     unet=choice.on, decoder=dec.on, also=also)
        r.compiled.enable()
    else:
        r.compiled = None
    if not remote and r.pipe is not None:  # a kept pipeline compiled by an earlier job: undo what is not wanted
        if not choice.on and getattr(r.pipe, "_compiled_unet", None) is not None:
            r.pipe.compile_unet(None)
        if not dec.on and getattr(r.pipe, "_compiled_decode", None) is not None:
            r.pipe.compile_decoder(None)
    return choice


def summary_note(r) -> str:
    """The compile clause for a job's summary line (a compile that failed over to eager says so)."""
    compiled = getattr(r, "compiled", None)
    return compiled.note if compiled is not None else getattr(r, "compile_note", "")
