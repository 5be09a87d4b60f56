"""Storyboard scripts on tiny weights: panels from pictures, the sheet, the resolved script, clean errors."""

from __future__ import annotations

import numpy as np
import pytest
import yaml

from retarget.cli import main


@pytest.fixture(scope="module")
def inputs(tmp_path_factory, astronaut_rgb):
    from render.storyboard import save_image
    from retarget.samples import sample_actor, write_sample_drive

    d = tmp_path_factory.mktemp("board")
    save_image(d / "actor.png", sample_actor())
    save_image(d / "face.png", astronaut_rgb)
    save_image(d / "blank.png", np.full((96, 96, 3), 200, np.uint8))
    write_sample_drive(d / "clip.mp4", seconds=1.0, fps=25, size=160)
    return d


SIX = """
title: six panels
columns: 4
defaults: {seed: 1}
panels:
  - {source: face.png, caption: the astronaut}
  - {source: clip.mp4@0.4, caption: a moment}
  - {source: jaw_open}
  - {source: {jaw: 0.3, eyelids: 1}, caption: numbers, exp_scale: 1.5}
  - {source: eyes_closed, seed: 3, caption: other seed}
  - {source: clip.mp4#10, gain: "jaw=1.5", ref_strength: 0.5}
"""


def _run(inputs, tiny_weights, script, out, *extra):
    return main(["storyboard", str(inputs / "actor.png"), "--script", str(script), "-o", str(out),
                 "--weights", str(tiny_weights), "--steps", "2", "--device", "cpu", *extra])


def test_six_panels_sheet_and_resolved_script_re_render_identically(inputs, tiny_weights, tmp_path, capsys):
    from render.storyboard import cell_layout
    from retarget.run import read_image

    script = inputs / "six.yaml"
    script.write_text(SIX)
    out = tmp_path / "board"
    assert _run(inputs, tiny_weights, script, out, "--cell", "64") == 0
    printed = capsys.readouterr().out
    assert "six.yaml: panel 1: face.png: 1 face found" in printed
    panels = sorted(out.glob("panel_*.png"))
    assert [p.name for p in panels] == [f"panel_0{i}.png" for i in range(1, 7)]
    sheet = read_image(out / "sheet.png")
    gap, label_h, title_h = cell_layout(64)
    w, h = gap + 4 * (64 + gap), title_h + gap + 2 * (64 + label_h + gap)  # 4 columns, 2 rows
    assert sheet.shape[:2] == (h + h % 2, w + w % 2)
    doc = yaml.safe_load((out / "six.resolved.yaml").read_text())
    assert len(doc["panels"]) == 6 and all(len(p["source"]["params"]) == 55 for p in doc["panels"])
    assert doc["panels"][0]["from"] == "face.png" and doc["panels"][4]["seed"] == 3
    assert doc["panels"][5]["gain"] == "jaw=1.5" and doc["panels"][5]["ref_strength"] == 0.5
    assert doc["panels"][3]["source"]["params"][52] == pytest.approx(0.3)
    first = [read_image(p) for p in panels]
    assert not np.array_equal(first[2], first[3])  # different expressions give different pixels

    # The resolved script alone (no pictures beside it) re-renders the same PNGs.
    alone = tmp_path / "elsewhere"
    alone.mkdir()
    (alone / "six.resolved.yaml").write_text((out / "six.resolved.yaml").read_text())
    again = tmp_path / "again"
    assert _run(inputs, tiny_weights, alone / "six.resolved.yaml", again, "--cell", "64") == 0
    for p, img in zip(panels, first):
        np.testing.assert_array_equal(read_image(again / p.name), img)


@pytest.mark.parametrize("script, message", [
    ("panels: [{source: blank.png}]", "panel 1: blank.png: no face found in the photo"),
    ("panels: [neutral, {source: clip.mp4@7}]", "panel 2: clip.mp4@7: time 7 s is beyond the clip's end"),
    ("panels: [{source: clip.mp4#80}]", "panel 1: clip.mp4#80: frame 80 is out of range"),
    ("panels: [{source: smirk_nobody_saved}]", "panel 1: smirk_nobody_saved: unknown preset"),
    ("panels: [{source: neutral, colour: red}]", "panel 1: unknown key(s) colour"),
    ("panels: [{caption: no source}]", "panel 1: missing `source:`"),
    ("panels: [{source: neutral, seed: 1.5}]", "panel 1 seed must be an integer"),
    ("panels: [{source: neutral, gain: nose=2}]", "panel 1: gain: expected NAME=VALUE"),
    ("panels: [{source: neutral}\n  - oops", "bad.yaml: not valid YAML at line"),
    ("pannels: []", "unknown key(s) pannels"),
])
def test_bad_scripts_fail_in_one_line_before_the_pipeline_loads(script, message, inputs, tiny_weights, tmp_path,
                                                                 capsys, monkeypatch):
    from retarget.pipeline import RetargetPipeline

    def never(*a, **k):
        raise AssertionError("the pipeline was constructed")

    monkeypatch.setattr(RetargetPipeline, "from_weights", never)
    monkeypatch.setenv("RETARGET_PRESETS", str(tmp_path / "presets"))
    bad = inputs / "bad.yaml"
    bad.write_text(script)
    assert _run(inputs, tiny_weights, bad, tmp_path / "out") == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and message in err[0], err
    assert not (tmp_path / "out" / "sheet.png").exists()


def test_outputs_never_overwrite_an_input(inputs, tiny_weights, tmp_path, capsys):
    from render.storyboard import save_image

    d = tmp_path / "d"
    d.mkdir()
    save_image(d / "panel_01.png", np.asarray(__import__("skimage").data.astronaut()))
    (d / "s.yaml").write_text("panels: [panel_01.png]")
    assert _run(inputs, tiny_weights, d / "s.yaml", d) == 1
    assert "panel_01.png would overwrite an input" in capsys.readouterr().err
