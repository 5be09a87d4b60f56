"""Every option is checked when parsed: exit 2 and one `error:` line before any video is read,
face tracked or model loaded (those are made to fail loudly here, so a check that came too late
would show up as another message)."""

from __future__ import annotations

import math

import pytest

from render.errors import RetargetError
from retarget.cli import EXIT_USAGE, main


@pytest.fixture
def no_work(monkeypatch):
    """Reading a video, tracking and loading models all raise: nothing expensive may start."""
    import render.video
    import tracking.tracker
    from retarget import pipeline

    def forbidden(*a, **kw):
        raise AssertionError("expensive work started before the options were checked")

    monkeypatch.setattr(render.video, "open_video", forbidden)
    monkeypatch.setattr(tracking.tracker, "track_video", forbidden)
    monkeypatch.setattr(pipeline.RetargetPipeline, "from_weights", classmethod(forbidden))


RUN = ["run", "drive.mp4", "actor.jpg", "-o", "out.mp4"]
TRACK = ["track", "drive.mp4"]
STORY = ["storyboard", "actor.jpg", "-o", "s.png", "--presets", "neutral"]
TRANS = ["transition", "actor.jpg", "keys.json", "-o", "t.mp4"]

# (argv, words of the error line). docs/BAD_INPUTS.md lists these rows; test_table_lists_every_case keeps it so.
BAD_OPTIONS = [
    (RUN + ["--steps", "-3"], "--steps: must be >= 1, got -3"),
    (RUN + ["--steps", "0"], "--steps: must be >= 1, got 0"),
    (RUN + ["--exp-scale", "nan"], "--exp-scale: must be a finite number, got nan"),
    (RUN + ["--exp-scale", "-1"], "--exp-scale: must be >= 0, got -1"),
    (RUN + ["--guidance", "-0.5"], "--guidance: must be >= 0, got -0.5"),
    (RUN + ["--ref-strength", "inf"], "--ref-strength: must be a finite number, got inf"),
    (RUN + ["--seed", "-1"], "--seed: must be >= 0, got -1"),
    (RUN + ["--fps", "0"], "--fps: must be > 0, got 0"),
    (RUN + ["--batch", "-2"], "--batch: must be >= 0, got -2"),
    (RUN + ["--start", "-1"], "--start: must be a finite number of seconds >= 0, got -1.0"),
    (RUN + ["--start", "2", "--end", "1"], "--end 1 must be after --start 2"),
    (RUN + ["--neutral-frame", "-1"], "--neutral-frame: must be >= 0, got -1"),
    (RUN + ["--gain", "jaw=x"], "--gain: 'x' is not a number (in 'jaw=x')"),
    (RUN + ["--gain", "nose=1"], "--gain: expected NAME=VALUE with NAME in"),
    (RUN + ["--gain", "jaw=inf"], "--gain: 'jaw=inf' is not finite"),
    (RUN + ["--device", "cpu", "--dtype", "fp16"], "--dtype fp16 needs a GPU; use fp32 or bf16 on the CPU"),
    (TRACK + ["--cutoff-hz", "0"], "--cutoff-hz: must be > 0, got 0"),
    (TRACK + ["--beta", "-1"], "--beta: must be >= 0, got -1"),
    (TRACK + ["--redetect-every", "0"], "--redetect-every: must be >= 1, got 0"),
    (TRACK + ["--max-frames", "0"], "--max-frames: must be >= 1, got 0"),
    (TRACK + ["--image-fps", "-5"], "--image-fps: must be > 0, got -5"),
    (TRACK + ["--batch-size", "-1"], "--batch-size: must be >= 0, got -1"),
    (STORY + ["--steps", "-1"], "--steps: must be >= 1, got -1"),
    (TRANS + ["--exp-scale", "-2"], "--exp-scale: must be >= 0, got -2"),
]
# Plain argparse options get argparse's own `retarget X: error: argument --fps: ...` line.
BAD_PLAIN = [
    (TRANS + ["--fps", "0"], "argument --fps: must be > 0, got 0"),
    (STORY + ["--columns", "0"], "argument --columns: must be >= 1, got 0"),
    (STORY + ["--cell", "8"], "argument --cell: must be >= 16, got 8"),
    (["demo", "--seconds", "0"], "argument --seconds: must be > 0, got 0"),
    (["demo", "--steps", "-1"], "argument --steps: must be >= 1, got -1"),
    (RUN + ["--steps", "2.5"], "argument --steps: invalid int value: '2.5'"),
    (RUN + ["--smooth", "wobbly"], "argument --smooth: invalid choice: 'wobbly'"),
]


def _error_lines(err: str) -> list[str]:
    return [line for line in err.splitlines() if "error:" in line]


@pytest.mark.parametrize("argv, words", BAD_OPTIONS, ids=[" ".join(a[0:1] + a[-2:]) for a, _ in BAD_OPTIONS])
def test_bad_option_exits_2_before_any_work(argv, words, no_work, capsys):
    rc = main(argv)
    err = capsys.readouterr().err
    assert rc == EXIT_USAGE, err
    lines = _error_lines(err)
    assert len(lines) == 1 and lines[0].startswith("error: ") and words in lines[0], err


@pytest.mark.parametrize("argv, words", BAD_PLAIN, ids=[" ".join(a[0:1] + a[-2:]) for a, _ in BAD_PLAIN])
def test_bad_plain_option_is_argparse_usage_error(argv, words, no_work, capsys):
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == EXIT_USAGE
    lines = _error_lines(capsys.readouterr().err)
    assert len(lines) == 1 and words in lines[0], lines


def test_library_callers_get_the_same_checks(no_work, tmp_path):
    """run() / make_transition() check their RunOptions too, before touching any input."""
    from retarget.run import RunOptions, run
    from retarget.sheets import make_transition

    with pytest.raises(RetargetError, match="--steps: must be >= 1"):
        run(tmp_path / "d.mp4", tmp_path / "a.png", tmp_path / "o.mp4", RunOptions(steps=-3))
    with pytest.raises(RetargetError, match="--ref-latent: choose one of sample, mode"):
        make_transition(tmp_path / "a.png", "[]", tmp_path / "o.mp4", RunOptions(ref_latent="median"))
    with pytest.raises(RetargetError, match="--guidance: must be a finite number"):
        run(tmp_path / "d.mp4", tmp_path / "a.png", tmp_path / "o.mp4", RunOptions(guidance=math.inf))


def test_good_options_pass(no_work):
    from retarget.cliargs import check_options
    from retarget.run import RunOptions
    from tracking.tracker import TrackOptions

    check_options(RunOptions())
    check_options(RunOptions(start=0.5, end=2, fps=12, gain="jaw=1.2", guidance=0, ref_strength=0, batch=0))
    check_options(TrackOptions())
    check_options(TrackOptions(smoothing="one_euro", beta=0, detect_workers=-1, max_frames=1))


def test_table_lists_every_case():
    """docs/BAD_INPUTS.md (the README's table of bad inputs) shows each case above with its message,
    and every test it names exists."""
    import re
    from pathlib import Path

    repo = Path(__file__).resolve().parents[2]
    doc = (repo / "docs" / "BAD_INPUTS.md").read_text()
    for argv, words in BAD_OPTIONS + BAD_PLAIN:
        row = next((line for line in doc.splitlines() if f"`retarget {' '.join(argv)}`" in line), None)
        assert row is not None and words in row, argv
    named = set(re.findall(r"\| (test_\w+)::(test_\w+) \|", doc))
    assert len([line for line in doc.splitlines() if line.startswith("| `") or line.startswith("| disk")]) >= 30
    for module, test in named:
        source = (repo / "tests" / "retarget" / f"{module}.py").read_text()
        assert f"def {test}(" in source, (module, test)
