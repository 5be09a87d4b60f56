"""The app's calls into the toolkit, and how they run: one GPU job at a time, in a thread
whose progress (the jobs' own tqdm bars: frames, frames/s, ETA) and log lines are read while it
runs, and which can be cancelled.

Every function here calls the same API as the CLI (retarget.run.run, retarget.sheets); none
re-implements a step. Errors stay `RetargetError`s with the CLI's one-line messages.
"""

from __future__ import annotations

import ctypes
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

from render.errors import RetargetError


class JobCancelled(BaseException):
    """Raised inside a job's thread when the user cancels it. A BaseException, so that no
    `except Exception` on the way swallows it; the toolkit's outputs are written under temporary
    names and renamed only when complete, so a cancelled job leaves no broken file."""


@dataclass
class Job:
    """A call running in its own thread. `status()` is a one-line progress report."""

    fn: Callable[..., Any]
    args: tuple = ()
    kwargs: dict = field(default_factory=dict)
    result: Any = None
    error: BaseException | None = None
    log_lines: list[str] = field(default_factory=list)
    started: float = field(default_factory=time.perf_counter)
    done: threading.Event = field(default_factory=threading.Event)

    def start(self) -> "Job":
        self._thread = threading.Thread(target=self._main, name="retarget-app-job", daemon=True)
        self._thread.start()
        return self

    def log(self, line: str) -> None:
        self.log_lines.append(str(line))

    def _main(self) -> None:
        try:
            self.result = self.fn(*self.args, log=self.log, **self.kwargs)
        except BaseException as e:  # handed to the caller, who decides what the user sees
            self.error = e
        finally:
            self.done.set()

    def cancel(self) -> None:
        """Stop the job at its next Python instruction (a running GPU kernel finishes first)."""
        if self.done.is_set():
            return
        # The jobs have no cancel points inside their tracking and rendering loops; an
        # asynchronous exception reaches the thread between two bytecodes, wherever it is.
        ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(self._thread.ident), ctypes.py_object(JobCancelled))
        self.done.wait(30)

    def status(self) -> str:
        """The live progress bars (tqdm's own text: count, rate, ETA), else the last log line."""
        from tqdm import tqdm

        bars = [str(b) for b in list(getattr(tqdm, "_instances", ())) if not getattr(b, "disable", False)]
        if bars:
            return " | ".join(bars)
        return self.log_lines[-1] if self.log_lines else f"working ({time.perf_counter() - self.started:.0f}s)"


class GpuQueue:
    """Runs one job at a time (the app's queue already serialises its events; this also holds
    for Python callers). `stream()` yields status lines while the job runs, then its result."""

    def __init__(self):
        self._lock = threading.Lock()

    def stream(self, fn: Callable[..., Any], *args, poll_s: float = 0.5, **kwargs) -> Iterator[tuple[str, Any]]:
        """Yield ("running", status line) while `fn(*args, log=..., **kwargs)` runs, then
        ("done", result). Raises the job's error. Closing the generator cancels the job."""
        with self._lock:
            job = Job(fn, args, kwargs).start()
            try:
                while not job.done.wait(poll_s):
                    yield "running", job.status()
            except GeneratorExit:
                job.cancel()
                raise
            if job.error is not None:
                raise job.error
            yield "done", job.result


# --------------------------------------------------------------------------- the calls

@dataclass
class RenderSettings:
    """The options every tab shares, as the widgets give them."""

    fast: bool = True
    ref_strength: float = 0.8
    exp_scale: float = 1.0
    seed: int = 0
    device: str = "auto"

    def options(self, **more):
        from retarget.run import RunOptions

        opts = RunOptions(fast=bool(self.fast), ref_strength=float(self.ref_strength),
                          exp_scale=float(self.exp_scale), seed=int(self.seed), device=self.device, **more)
        validate = getattr(opts, "validate", None)
        if validate:
            validate()
        return opts


def gain_spec(jaw: float, eyelids: float, expression: float) -> str | None:
    """The `--gain` text for three part gains (None when all are 1)."""
    if (jaw, eyelids, expression) == (1.0, 1.0, 1.0):
        return None
    return f"jaw={float(jaw):g},eyelids={float(eyelids):g},expression={float(expression):g}"


def retarget_video(drive, actor, out_dir, settings: RenderSettings, *, relative=False, gain=None, start=None,
                   end=None, weights=None, log=print) -> dict:
    """`retarget run` for the app: {"video", "preview", "summary"} (paths and the summary line)."""
    from pathlib import Path

    from retarget.run import run

    start = float(start) if start not in (None, "") and float(start) > 0 else None
    end = float(end) if end not in (None, "") and float(end) > 0 else None
    if start is not None and end is not None and end <= start:
        raise RetargetError(f"time range: end {end:g}s must be after start {start:g}s")
    out_dir = Path(out_dir)
    opts = settings.options(relative=bool(relative), gain=gain, start=start, end=end, preview="side-by-side",
                            work=str(out_dir / "work"))
    summary = run(drive, actor, out_dir / "out.mp4", opts, weights=weights, log=log)
    return {"video": str(summary.output), "preview": str(summary.preview) if summary.preview else None,
            "summary": page_text(summary.line(), out_dir)}


def page_text(line: str, out_dir) -> str:
    """A summary line for the page: the server's folders are not the user's business (nor anyone
    else's), so paths under `out_dir` are shown by file name."""
    return line.replace(f"{out_dir}/", "").replace(str(out_dir), ".")


def render_still(actor, params, out_path, settings: RenderSettings, *, weights=None, log=print) -> str:
    """One frame of the actor with the 55-d expression `params`, pasted back, saved as PNG."""
    import numpy as np

    from render.storyboard import save_image
    from retarget.sheets import render_expressions

    image = render_expressions(actor, np.asarray(params, np.float32)[None], settings.options(), weights=weights,
                               log=log)[0]
    return str(save_image(out_path, image))


def read_expression(spec, *, weights=None, log=print):
    """The 55 numbers of one expression source (a preset name, numbers, or an uploaded picture's
    path with its moment), through `retarget.sources` as everywhere else."""
    from retarget.sources import resolve_specs

    return resolve_specs([spec], where="expression studio", layout=weights, log=log)[0]


JAW, EYELID_L, EYELID_R = 52, 50, 51  # positions in the 55-d vector (SPEC.md §3)


def slider_values(params, n: int) -> list[float]:
    """[jaw opening, left eyelid, right eyelid, expression 0..n-1] of a 55-d vector."""
    import numpy as np

    p = np.asarray(params, np.float64)
    return [float(p[JAW]), float(p[EYELID_L]), float(p[EYELID_R])] + [float(v) for v in p[:n]]


def with_sliders(params, jaw, eyelid_l, eyelid_r, coeffs):
    """`params` (55,) (or neutral when None) with the sliders' values put in their places."""
    import numpy as np

    p = np.zeros(55, np.float32) if params is None else np.asarray(params, np.float32).copy()
    p[JAW], p[EYELID_L], p[EYELID_R] = float(jaw), float(eyelid_l), float(eyelid_r)
    p[:len(coeffs)] = [float(c) for c in coeffs]
    return p


def table_rows(table, columns: int, limit: int, what: str) -> list[list]:
    """The non-empty rows of a page table (a pandas DataFrame or a list of lists), each padded
    to `columns` cells. RetargetError when there are none or more than `limit`."""
    rows = table.values.tolist() if hasattr(table, "values") else list(table or [])
    rows = [list(r) + [None] * (columns - len(r)) for r in rows]
    rows = [r[:columns] for r in rows if r and str(r[0] if r[0] is not None else "").strip()]
    if not rows:
        raise RetargetError(f"no {what}s: fill in at least one row")
    if len(rows) > limit:
        raise RetargetError(f"{len(rows)} {what}s: at most {limit} in one job")
    return rows


def storyboard_job(actor, panels: list[list], uploads: dict, out_dir, settings: RenderSettings, *, columns: int = 3,
                   weights=None, log=print) -> dict:
    """`retarget storyboard --script` for the app. panels: [source text, caption] rows of the
    page's table; uploads: {file name: path} of the pictures they may name.
    Returns {"sheet", "files" (panel PNGs, sheet, resolved script), "summary"}."""
    from pathlib import Path

    from retarget.app.sources_in_app import app_spec
    from retarget.storyboard_script import parse_script, render_script

    rows = [{"source": app_spec(src, uploads, where=f"panel {i + 1}"),
             "caption": "" if cap is None else str(cap)} for i, (src, cap) in enumerate(panels)]
    script = parse_script({"panels": rows}, name="storyboard")
    res = render_script(actor, script, Path(out_dir) / "board", settings.options(), weights=weights,
                        columns=int(columns), log=log)
    files = [str(p) for p in res.panels] + [str(res.sheet), str(res.resolved)]
    return {"sheet": str(res.sheet), "files": files, "summary": page_text(res.line(), Path(out_dir) / "board")}


def transition_job(actor, keys: list[list], uploads: dict, out_dir, settings: RenderSettings, *,
                   easing: str = "smoothstep", fps: float = 25.0, weights=None, log=print) -> dict:
    """`retarget transition` for the app. keys: [source text, time (s), hold (s)] rows of the
    page's table; uploads: {file name: path} of the pictures they may name.
    Returns {"video", "files" (video, interpolated track file), "summary"}."""
    import json
    from pathlib import Path

    from retarget.app.sources_in_app import app_spec
    from retarget.sheets import make_transition
    from retarget.transitions import transition_track_path

    rows = []
    for i, (src, t, hold) in enumerate(keys):
        where = f"keyframe {i + 1}"
        try:
            key = {"time": float(t), "source": app_spec(src, uploads, where=where)}
            if hold not in (None, "") and float(hold) > 0:
                key["hold"] = float(hold)
        except (TypeError, ValueError):
            raise RetargetError(f"{where}: time and hold must be numbers of seconds") from None
        rows.append(key)
    out = Path(out_dir) / "transition.mp4"
    summary = make_transition(actor, json.dumps(rows), out, settings.options(), fps=float(fps), easing=easing,
                              weights=weights, log=log)
    track = transition_track_path(out)
    files = [str(out)] + ([str(track)] if track.is_file() else [])
    return {"video": str(out), "files": files, "summary": page_text(summary.line(), out_dir)}
