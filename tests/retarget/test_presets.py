"""The preset library and `retarget preset add|list|show|remove`."""

from __future__ import annotations

import json

import numpy as np
import pytest

from render.errors import RetargetError
from retarget.cli import main
from retarget.presets import PresetLibrary, read_preset_file


@pytest.fixture
def lib_dir(tmp_path, monkeypatch):
    d = tmp_path / "presets"
    monkeypatch.setenv("RETARGET_PRESETS", str(d))
    return d


def test_library_add_get_remove_round_trip(tmp_path):
    lib = PresetLibrary(tmp_path / "p")
    params = np.linspace(-1, 1, 55).astype(np.float32)
    preset, replaced = lib.add("half_smile", params, note="n", source="s.jpg")
    assert not replaced and preset.path == tmp_path / "p" / "half_smile.json"
    data = json.loads(preset.path.read_text())
    assert data["format"] == "retarget-preset" and data["version"] == 1 and len(data["params"]) == 55
    got = PresetLibrary(tmp_path / "p").get("half_smile")
    np.testing.assert_array_equal(got.params, params)  # float32 -> JSON -> float32 is exact
    assert (got.note, got.source, got.builtin) == ("n", "s.jpg", False)
    assert lib.add("half_smile", params * 0)[1] is True
    assert lib.names()[:4] == ["neutral", "jaw_open", "eyes_closed", "jaw_open_eyes_closed"]
    assert "half_smile" in lib.names()
    lib.remove("half_smile")
    assert "half_smile" not in lib and not any((tmp_path / "p").iterdir())  # no temporary file left


def test_builtins_cannot_be_replaced_or_removed_and_bad_files_are_named(tmp_path):
    lib = PresetLibrary(tmp_path)
    with pytest.raises(RetargetError, match="built in"):
        lib.add("jaw_open", np.zeros(55))
    with pytest.raises(RetargetError, match="built in"):
        lib.remove("neutral")
    with pytest.raises(RetargetError, match="use letters"):
        lib.add("../escape", np.zeros(55))
    (tmp_path / "old.json").write_text(json.dumps({"format": "retarget-preset", "version": 9, "params": []}))
    with pytest.raises(RetargetError, match="old.json has version 9"):
        read_preset_file(tmp_path / "old.json")
    (tmp_path / "junk.json").write_text("{")
    with pytest.raises(RetargetError, match="junk.json is not readable JSON"):
        lib.get("junk")


def test_default_folder_is_the_env_var_or_the_user_config_dir(monkeypatch, tmp_path):
    from platformdirs import user_config_dir

    monkeypatch.setenv("RETARGET_PRESETS", str(tmp_path))
    assert PresetLibrary().folder == tmp_path
    monkeypatch.delenv("RETARGET_PRESETS")
    assert PresetLibrary().folder == __import__("pathlib").Path(user_config_dir("retarget", appauthor=False)) / "presets"


def test_preset_cli_from_a_photo(lib_dir, tiny_weights, tmp_path, astronaut_rgb, capsys):
    from render.storyboard import save_image
    from retarget.weights import WeightsLayout
    from tracking.tracker import TrackOptions, track_video

    photo = save_image(tmp_path / "face.png", astronaut_rgb)
    w = ["--weights", str(tiny_weights)]
    assert main(["preset", "add", "astro", str(photo), "--note", "the astronaut", *w]) == 0
    out = capsys.readouterr().out
    assert "1 face found" in out and "saved 'astro'" in out
    direct = track_video(photo, smirk_path=WeightsLayout(tiny_weights).smirk_ckpt, progress=False,
                         options=TrackOptions(device="cpu")).params[0]
    np.testing.assert_allclose(PresetLibrary().get("astro").params, direct, atol=5e-5)
    assert main(["preset", "add", "astro", '{"jaw": 0.1}']) == 0
    assert "replaced the user preset 'astro'" in capsys.readouterr().out
    assert main(["preset", "list"]) == 0
    listing = capsys.readouterr().out
    assert "astro" in listing and "user" in listing and "jaw 0.10" in listing and "built in" in listing
    png = tmp_path / "astro.png"
    assert main(["preset", "show", "astro", "--plot", str(png)]) == 0
    shown = capsys.readouterr().out
    assert "jaw (open, side, forward; radians): 0.100" in shown and png.stat().st_size > 5000
    assert main(["preset", "remove", "astro"]) == 0
    assert main(["preset", "show", "astro"]) == 1
    assert "error: unknown preset 'astro'" in capsys.readouterr().err


@pytest.mark.parametrize("argv, message", [
    (["preset", "add", "jaw_open", '{"jaw": 0.1}'], "is built in and cannot be replaced"),
    (["preset", "remove", "eyes_closed"], "is built in and cannot be removed"),
    (["preset", "add", "x", "missing.jpg"], "preset add: missing.jpg: photo missing.jpg does not exist"),
    (["preset", "add", "x", "clip.mp4"], "say which moment"),
])
def test_preset_cli_errors_are_one_line(argv, message, lib_dir, capsys):
    assert main(argv) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and message in err[0]
