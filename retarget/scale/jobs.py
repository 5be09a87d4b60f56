"""`retarget batch jobs.yaml`: many run / storyboard / transition jobs from one file.

The file is checked whole before any work (unknown commands or options, missing fields, two
jobs writing one output: one error naming the job). Then each job runs through the same
functions as its CLI command, isolated: a bad input fails that job with its one-line error and
the others go on. A JSON status file beside the jobs file is rewritten after every job; running
the same file again skips the jobs done earlier (same spec, output present) and resumes the
others from their work folders. With Ray, jobs that load the same pipeline share the workers.

File format (paths relative to the file's folder):

    defaults: {weights: ~/w, steps: 25}          # optional: options for every job
    jobs:
      - {name: take1, command: run, drive: take1.mp4, actor: alice.jpg, output: out/take1.mp4, fast: true}
      - {command: storyboard, actor: bob.jpg, output: out/bob.png, presets: "neutral,jaw_open"}
      - {command: transition, actor: bob.jpg, keyframes: keys.json, output: out/bob.mp4, fps: 25}
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
import os
import time
import typing
from dataclasses import dataclass
from pathlib import Path

from render.errors import RetargetError

# Per command: required keys, optional keys with defaults (beyond RunOptions fields), and the
# RunOptions fields the command does not take (as its CLI parser).
_DRIVING_ONLY = ("track", "smooth", "start", "end", "fps", "relative", "neutral_frame", "gain", "preview")
COMMANDS = {
    "run": dict(required=("drive", "actor", "output"), extra={}, exclude=()),
    "storyboard": dict(required=("actor", "output"),
                       extra=dict(presets=None, keyframes=None, track=None, times=None, frames=None, columns=4,
                                  cell=256, paste_back=False),
                       exclude=_DRIVING_ONLY + ("frames_dir", "resume", "work", "keep_work")),
    "transition": dict(required=("actor", "keyframes", "output"), extra=dict(fps=25.0, easing="smoothstep"),
                       exclude=_DRIVING_ONLY),
}
PATH_KEYS = ("drive", "actor", "output", "track", "work", "frames_dir", "weights", "sd15")
STATUSES = ("pending", "running", "done", "failed", "interrupted")


@dataclass
class Job:
    """One checked job: its command, paths resolved, RunOptions built, and the rest of its keys."""

    name: str
    command: str
    output: Path
    inputs: dict          # drive / actor / keyframes ... (paths resolved)
    options: object       # RunOptions
    extra: dict           # command-specific keys (storyboard picks, transition fps/easing)
    weights: str | None
    spec: str             # hash of everything above: a changed job is a new job
    sd15: str | None = None  # a Stable Diffusion 1.5 folder for what the weights folder lacks (--sd15)

    def describe(self) -> str:
        return f"job {self.name!r} ({self.command})"


@dataclass
class JobResult:
    name: str
    command: str
    output: str
    status: str = "pending"
    error: str | None = None
    seconds: float = 0.0
    frames: int | None = None
    rendered: int | None = None
    spec: str = ""
    skipped: bool = False  # done by an earlier run of the same file


# --------------------------------------------------------------------------- reading the file

def load_jobs(path: str | os.PathLike, *, weights: str | None = None, sd15: str | None = None) -> list[Job]:
    """The checked jobs of a YAML (or JSON) jobs file; RetargetError naming the file, the job and
    the key for anything wrong with it. `weights`, `sd15`: default weights and SD 1.5 folders (the
    CLI's --weights, --sd15), for jobs and defaults that name none."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise RetargetError(f"jobs file {path} does not exist")
    try:
        doc = yaml.safe_load(path.read_text())
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise RetargetError(f"jobs file {path} is not valid YAML: {' '.join(str(e).split())[:200]}") from None
    if isinstance(doc, list):
        doc = {"jobs": doc}
    if not isinstance(doc, dict) or not isinstance(doc.get("jobs"), list) or not doc["jobs"]:
        raise RetargetError(f"jobs file {path}: expected a list of jobs under 'jobs:'")
    unknown = set(doc) - {"jobs", "defaults"}
    if unknown:
        raise RetargetError(f"jobs file {path}: unknown top-level key(s) {', '.join(sorted(unknown))} "
                            "(expected 'jobs' and optionally 'defaults')")
    defaults = doc.get("defaults") or {}
    if not isinstance(defaults, dict):
        raise RetargetError(f"jobs file {path}: 'defaults' must be a mapping of options")
    jobs, problems = [], []
    for n, raw in enumerate(doc["jobs"], 1):
        try:
            if not isinstance(raw, dict):
                raise RetargetError("must be a mapping of keys (command, actor, output, ...)")
            jobs.append(_check_job({**defaults, **raw}, n, path.parent, weights, sd15))
        except RetargetError as e:
            label = raw.get("name") if isinstance(raw, dict) and raw.get("name") else f"#{n}"
            problems.append(f"job {label}: {e}")
    names, outputs = {}, {}
    for j in jobs:
        if j.name in names:
            problems.append(f"job {j.name}: the name is used twice")
        names[j.name] = j
        if j.output in outputs:
            problems.append(f"job {j.name}: writes {j.output}, as job {outputs[j.output].name} does")
        outputs[j.output] = j
    inputs = {p: j for j in jobs for p in (*j.inputs.values(), *j.extra.values()) if isinstance(p, Path)}
    for j in jobs:
        if j.output in inputs:
            problems.append(f"job {j.name}: its output {j.output} is an input of job {inputs[j.output].name}")
    if problems:
        raise RetargetError(f"jobs file {path}: " + "; ".join(problems))
    return jobs


def _check_job(d: dict, n: int, base: Path, default_weights: str | None, default_sd15: str | None = None) -> Job:
    from retarget.run import RunOptions

    command = d.get("command", "run")
    if command not in COMMANDS:
        raise RetargetError(f"unknown command {command!r}; use one of {', '.join(COMMANDS)}")
    spec = COMMANDS[command]
    missing = [k for k in spec["required"] if d.get(k) in (None, "")]
    if missing:
        raise RetargetError(f"{command} needs {', '.join(missing)}")
    fields = {f.name: f for f in dataclasses.fields(RunOptions)}
    allowed_opts = [k for k in fields if k not in spec["exclude"]]
    known = set(spec["required"]) | set(spec["extra"]) | set(allowed_opts) | {"command", "name", "weights", "sd15"}
    for k in d:
        if k not in known:
            close = difflib.get_close_matches(k, sorted(known), n=1)
            raise RetargetError(f"unknown key {k!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))

    def resolve(v) -> Path:
        p = Path(os.path.expanduser(str(v)))
        return p if p.is_absolute() else (base / p)

    def value(k: str, v):
        if k == "keyframes":  # a file, JSON text, or keyframes written inline in the YAML
            if not isinstance(v, str):
                return json.dumps(v)
            return v if v.lstrip()[:1] in "[{" else str(resolve(v))
        return resolve(v) if k in PATH_KEYS else v

    inputs = {k: value(k, d[k]) for k in spec["required"] if k != "output"}
    extra = {k: value(k, d[k]) if d.get(k) is not None else default for k, default in spec["extra"].items()}
    for k, tp in (("columns", int), ("cell", int), ("fps", (int, float))):
        if k in extra and (not isinstance(extra[k], tp) or isinstance(extra[k], bool) or extra[k] <= 0):
            raise RetargetError(f"{k} must be a positive number, got {extra[k]!r}")
    hints = typing.get_type_hints(RunOptions)
    kwargs = {}
    for k in allowed_opts:
        if k in d and k not in spec["extra"]:
            kwargs[k] = _typed(k, d[k], hints[k])
            if k in PATH_KEYS and kwargs[k] is not None:
                kwargs[k] = str(resolve(kwargs[k]))
    try:
        options = RunOptions(**kwargs)
    except (TypeError, ValueError) as e:
        raise RetargetError(str(e)) from None
    output = resolve(d["output"])
    weights = d.get("weights", default_weights)
    weights = str(resolve(weights)) if weights else None
    sd15 = d.get("sd15", default_sd15)
    sd15 = str(resolve(sd15)) if sd15 else None
    name = str(d.get("name") or f"{n}-{output.stem}")
    # Input files enter the spec by content, so a job whose photo or clip changed is not "done".
    files = {k: _fingerprint(v) for k, v in {**inputs, **extra, "track": options.track}.items()
             if isinstance(v, (str, Path)) and k in PATH_KEYS + ("keyframes",)}
    blob = json.dumps(dict(command=command, output=str(output), inputs={k: str(v) for k, v in inputs.items()},
                           extra={k: str(v) for k, v in extra.items()}, options=dataclasses.asdict(options),
                           weights=weights, sd15=sd15, files=files), sort_keys=True)
    return Job(name=name, command=command, output=output, inputs=inputs, options=options, extra=extra,
               weights=weights, sd15=sd15, spec=hashlib.sha256(blob.encode()).hexdigest()[:16])


def _fingerprint(v) -> str:
    from retarget.run import file_fingerprint

    p = Path(v)
    try:
        return file_fingerprint(p) if p.is_file() else "-"
    except OSError:
        return "-"


def _typed(key: str, value, hint):
    """Check a YAML value against a RunOptions field's type (bool, int, float, str, Literal, Optional)."""
    from retarget.cliargs import _base_type

    optional = type(None) in typing.get_args(hint)
    if value is None:
        if optional:
            return None
        raise RetargetError(f"{key} must not be empty")
    tp = _base_type(hint)
    if typing.get_origin(hint) is typing.Literal or any(typing.get_origin(a) is typing.Literal
                                                         for a in typing.get_args(hint)):
        lit = hint if typing.get_origin(hint) is typing.Literal else next(
            a for a in typing.get_args(hint) if typing.get_origin(a) is typing.Literal)
        if value not in typing.get_args(lit):
            raise RetargetError(f"{key} must be one of {', '.join(map(str, typing.get_args(lit)))}, got {value!r}")
        return value
    ok = (isinstance(value, bool) if tp is bool else
          isinstance(value, int) and not isinstance(value, bool) if tp is int else
          isinstance(value, (int, float)) and not isinstance(value, bool) if tp is float else
          isinstance(value, (str, int, float)) and not isinstance(value, bool) if tp is str else True)
    if not ok:
        raise RetargetError(f"{key} must be {'an' if tp is int else 'a'} {tp.__name__}, got {value!r}")
    return str(value) if tp is str else tp(value)


# --------------------------------------------------------------------------- running

class _LocalPipelines:
    """The prepare= hook without Ray: one loaded pipeline kept for consecutive jobs that can share it."""

    def __init__(self):
        self.key, self.pipe = None, None

    def prepare(self, layout, actor_path, opts, log, actor_rgb=None):
        from retarget.run import prepare_rendering
        from retarget.scale.pool import load_key

        key = load_key(layout, opts)
        if key != self.key:
            self.pipe = None
            r = prepare_rendering(layout, actor_path, opts, log, actor_rgb=actor_rgb)
            self.key, self.pipe = key, r.pipe
            return r
        return prepare_rendering(layout, actor_path, opts, log, actor_rgb=actor_rgb, pipe=self.pipe)

    def close(self):
        self.key, self.pipe = None, None


class _RayPools:
    """The prepare= hook with Ray: one RayPool at a time, replaced when a job needs another pipeline."""

    def __init__(self, ray_opts, log):
        self.ray_opts, self.log, self.pool = ray_opts, log, None

    def prepare(self, layout, actor_path, opts, log, actor_rgb=None):
        from retarget.scale.pool import RayPool, load_key

        if self.pool is not None and (self.pool.key != load_key(layout, opts) or not self.pool_healthy()):
            self.pool.close()
            self.pool = None
        if self.pool is None:
            self.pool = RayPool(self.ray_opts, layout, opts, log=self.log)
        return self.pool.prepare(layout, actor_path, opts, log, actor_rgb=actor_rgb)

    def pool_healthy(self) -> bool:
        return bool(self.pool.alive) or not self.pool.actors

    def close(self):
        if self.pool is not None:
            self.pool.close()
        self.pool = None


def run_job(job: Job, prepare, log=print):
    """Run one job through the functions its CLI command calls; returns (frames, rendered)."""
    from retarget.weights import WeightsLayout

    layout = WeightsLayout(job.weights, sd15=job.sd15)
    if job.command == "run":
        from retarget.run import run

        s = run(job.inputs["drive"], job.inputs["actor"], job.output, job.options, weights=layout, log=log,
                prepare=prepare)
        return s.frames, s.rendered
    if job.command == "transition":
        from retarget.sheets import make_transition

        s = make_transition(job.inputs["actor"], str(job.inputs["keyframes"]), job.output, job.options,
                            fps=float(job.extra["fps"]), easing=job.extra["easing"], weights=layout, log=log,
                            prepare=prepare)
        return s.frames, s.rendered
    from retarget.sheets import make_storyboard, storyboard_expressions

    e = job.extra
    cells = storyboard_expressions(track=e["track"] and str(e["track"]), times=_csv(e["times"]),
                                   frames=_csv(e["frames"]), keyframes=e["keyframes"] and str(e["keyframes"]),
                                   presets=_csv(e["presets"]))
    opts = dataclasses.replace(job.options, paste_back=bool(e["paste_back"]))
    make_storyboard(job.inputs["actor"], job.output, cells, opts, weights=layout, columns=int(e["columns"]),
                    cell=int(e["cell"]), log=log, prepare=prepare)
    return len(cells), len(cells)


def _csv(v):
    """YAML lists or comma-separated text -> the CLI's comma-separated text."""
    if v is None:
        return None
    return ",".join(map(str, v)) if isinstance(v, (list, tuple)) else str(v)


def default_status_path(jobs_file: Path) -> Path:
    return jobs_file.with_name(jobs_file.stem + ".status.json")


def run_jobs(jobs: list[Job], *, status_path: Path, ray_opts=None, fresh: bool = False, log=print) -> list[JobResult]:
    """Run every job in order (see the module docstring); the status file is rewritten after each.
    Returns the results; never raises for a job's own failure (KeyboardInterrupt is re-raised)."""
    earlier = {} if fresh else _read_status(status_path)
    results = [JobResult(j.name, j.command, str(j.output), spec=j.spec) for j in jobs]
    hook = _LocalPipelines() if ray_opts is None else _RayPools(ray_opts, log)
    if ray_opts is not None:
        from retarget.scale.pool import connect

        hook._started = connect(ray_opts.address)  # a wrong address fails before any job
    try:
        for k, (job, res) in enumerate(zip(jobs, results), 1):
            old = earlier.get(job.name)
            same = bool(old) and old.get("spec") == job.spec
            if same and old.get("status") == "done" and job.output.exists():
                res.status, res.skipped = "done", True
                res.frames, res.rendered, res.seconds = old.get("frames"), 0, 0.0
                log(f"[{k}/{len(jobs)}] {job.name}: done earlier, skipped")
                continue
            res.status = "running"
            _write_status(status_path, results)
            prefix = f"[{k}/{len(jobs)}] {job.name}"
            log(f"{prefix}: {job.command} -> {job.output}")
            # A job run before with the same spec resumes from its work folder; a changed job starts over.
            opts = job.options
            if job.command != "storyboard":
                opts = dataclasses.replace(opts, resume=same or opts.resume)
            t0 = time.perf_counter()
            try:
                res.frames, res.rendered = run_job(dataclasses.replace(job, options=opts), hook.prepare,
                                                   log=lambda m, p=prefix: log(f"{p}: {m}"))
                res.status = "done"
            except RetargetError as e:
                res.status, res.error = "failed", str(e)
            except KeyboardInterrupt:
                res.status, res.error = "interrupted", "interrupted"
                raise
            except Exception as e:  # isolation: one job's surprise must not stop the others
                res.status, res.error = "failed", _unexpected(e)
            finally:
                res.seconds = time.perf_counter() - t0
                _write_status(status_path, results)
            if res.status == "failed":
                log(f"{prefix}: error: {res.error}")
    finally:
        hook.close()
        if ray_opts is not None and getattr(hook, "_started", False):
            import ray

            ray.shutdown()
        _write_status(status_path, results)
    return results


def _unexpected(e: BaseException) -> str:
    if type(e).__name__ == "OutOfMemoryError" or "out of memory" in str(e).lower():
        return "out of GPU memory: try a smaller batch, fast: true, or close other GPU programs"
    if isinstance(e, OSError) and e.filename:
        return f"{e.strerror or type(e).__name__}: {e.filename}"
    first = str(e).splitlines()[0] if str(e) else ""
    return f"unexpected {type(e).__name__}: {first}"


def _read_status(path: Path) -> dict:
    try:
        doc = json.loads(path.read_text())
        return {j["name"]: j for j in doc.get("jobs", [])}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return {}


def _write_status(path: Path, results: list[JobResult]) -> None:
    from render.files import atomic_open

    counts = {s: sum(r.status == s for r in results) for s in STATUSES}
    doc = dict(updated=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), counts=counts,
               jobs=[dataclasses.asdict(r) for r in results])
    with atomic_open(path, "w") as f:
        f.write(json.dumps(doc, indent=1))


def format_summary(results: list[JobResult]) -> str:
    """The table printed at the end: one row per job, and a count line."""
    rows = [("job", "command", "status", "frames", "time", "output / error")]
    for r in results:
        status = "done (earlier)" if r.skipped else r.status
        rows.append((r.name, r.command, status, "-" if r.frames is None else str(r.frames),
                     "-" if r.skipped else f"{r.seconds:.1f}s",
                     r.output if r.status == "done" else f"error: {r.error}" if r.error else r.output))
    widths = [max(len(row[c]) for row in rows) for c in range(5)]
    lines = ["  ".join(row[c].ljust(widths[c]) for c in range(5)) + "  " + row[5] for row in rows]
    failed = sum(r.status == "failed" for r in results)
    done = sum(r.status == "done" for r in results)
    lines.append(f"{done} of {len(results)} jobs done" + (f", {failed} failed" if failed else ""))
    return "\n".join(lines)
