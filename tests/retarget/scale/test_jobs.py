"""The jobs file of `retarget batch` is checked whole before any work (no models loaded here)."""

from __future__ import annotations

import json

import pytest

from render.errors import RetargetError
from retarget.scale.jobs import JobResult, format_summary, load_jobs


def _write(tmp_path, text: str):
    p = tmp_path / "jobs.yaml"
    p.write_text(text)
    return p


def test_paths_defaults_and_options(tmp_path):
    p = _write(tmp_path, """
defaults: {weights: w, steps: 3, fast: true}
jobs:
  - {name: a, command: run, drive: in/d.mp4, actor: a.jpg, output: out/a.mp4, steps: 5}
  - {command: storyboard, actor: a.jpg, output: out/s.png, presets: [neutral, jaw_open], columns: 2}
  - command: transition
    actor: a.jpg
    output: out/t.mp4
    fps: 12
    keyframes: [{time: 0, preset: neutral}, {time: 1, jaw: 0.3}]
""")
    a, s, t = load_jobs(p)
    assert a.inputs["drive"] == tmp_path / "in/d.mp4" and a.output == tmp_path / "out/a.mp4"
    assert a.options.steps == 5 and a.options.fast is True  # the job's own value wins over defaults
    assert a.weights == str(tmp_path / "w")
    assert s.name == "2-s" and s.extra["presets"] == ["neutral", "jaw_open"] and s.extra["columns"] == 2
    assert s.extra["paste_back"] is False  # as `retarget storyboard`
    assert t.extra["fps"] == 12 and json.loads(t.inputs["keyframes"])[1]["jaw"] == 0.3
    assert len({a.spec, s.spec, t.spec}) == 3
    assert a.sd15 is None


def test_sd15_folder_from_the_file_or_the_command_line(tmp_path):
    """`sd15:` in the file (relative to it) or `retarget batch --sd15 DIR`: each job's weights layout
    looks there for vae/, scheduler/, tokenizer/, and Ray workers load with it (part of the load key)."""
    from retarget.run import RunOptions
    from retarget.scale.pool import load_key
    from retarget.weights import WeightsLayout

    p = _write(tmp_path, """
jobs:
  - {name: a, drive: d.mp4, actor: a.jpg, output: a.mp4, sd15: sd}
  - {name: b, drive: d.mp4, actor: a.jpg, output: b.mp4}
""")
    a, b = load_jobs(p, weights=str(tmp_path / "w"), sd15="/models/sd15")
    assert a.sd15 == str(tmp_path / "sd") and b.sd15 == "/models/sd15"
    assert b.spec != load_jobs(p, weights=str(tmp_path / "w"))[1].spec  # another SD folder: another job
    ka = load_key(WeightsLayout(a.weights, sd15=a.sd15), RunOptions())
    kb = load_key(WeightsLayout(b.weights, sd15=b.sd15), RunOptions())
    assert ka != kb  # another SD 1.5 folder is another loaded pipeline: no shared workers


@pytest.mark.parametrize("body,words", [
    ("- {command: run, actor: a.jpg, output: o.mp4}", ["#1", "needs drive"]),
    ("- {command: render, actor: a.jpg, output: o.mp4}", ["unknown command 'render'"]),
    ("- {name: x, drive: d.mp4, actor: a.jpg, output: o.mp4, stepz: 3}", ["job x", "'stepz'", "'steps'"]),
    ("- {drive: d.mp4, actor: a.jpg, output: o.mp4, steps: many}", ["steps must be an int"]),
    ("- {drive: d.mp4, actor: a.jpg, output: o.mp4, smooth: wobbly}", ["smooth must be one of"]),
    ("- {command: storyboard, actor: a.jpg, output: o.png, start: 1}", ["unknown key 'start'"]),
    ("- {drive: d.mp4, actor: a.jpg, output: o.mp4}\n- {drive: e.mp4, actor: a.jpg, output: o.mp4}",
     ["writes", "o.mp4"]),
    ("- {drive: d.mp4, actor: a.jpg, output: o.mp4}\n- {drive: o.mp4, actor: a.jpg, output: p.mp4}",
     ["is an input of job"]),
])
def test_bad_files_fail_before_any_work(tmp_path, body, words):
    p = _write(tmp_path, "jobs:\n" + "\n".join("  " + line for line in body.splitlines()) + "\n")
    with pytest.raises(RetargetError) as e:
        load_jobs(p)
    for w in words:
        assert w in str(e.value), str(e.value)


def test_not_yaml_and_empty(tmp_path):
    with pytest.raises(RetargetError, match="not valid YAML"):
        load_jobs(_write(tmp_path, "jobs: [ {a: 1"))
    with pytest.raises(RetargetError, match="list of jobs"):
        load_jobs(_write(tmp_path, "defaults: {}\n"))
    with pytest.raises(RetargetError, match="does not exist"):
        load_jobs(tmp_path / "nope.yaml")


def test_summary_names_the_failed_job():
    rows = [JobResult("a", "run", "a.mp4", status="done", frames=5, seconds=1.0),
            JobResult("b", "storyboard", "b.png", status="failed", error="no face found")]
    text = format_summary(rows)
    b_line = next(line for line in text.splitlines() if line.startswith("b "))
    assert "failed" in b_line and "error: no face found" in b_line
    assert text.splitlines()[-1] == "1 of 2 jobs done, 1 failed"


def test_spec_follows_input_content(tmp_path):
    (tmp_path / "a.jpg").write_bytes(b"one")
    p = _write(tmp_path, "jobs:\n  - {drive: d.mp4, actor: a.jpg, output: o.mp4}\n")
    first = load_jobs(p)[0].spec
    assert load_jobs(p)[0].spec == first
    (tmp_path / "a.jpg").write_bytes(b"two")  # another photo under the same name: not the job done before
    assert load_jobs(p)[0].spec != first


def test_wrong_ray_address_fails_at_once():
    from retarget.scale.pool import _probe

    with pytest.raises(RetargetError, match="nothing answers at 127.0.0.1:1"):
        _probe("127.0.0.1:1")  # Ray itself would retry for minutes
    with pytest.raises(RetargetError, match="expected auto, local, HOST:PORT"):
        _probe("headnode")
