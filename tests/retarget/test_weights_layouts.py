"""The weights folder as users of the release have it: arcface.onnx in antelopev2/, SD 1.5 parts
from `--sd15 DIR` or the local Hugging Face cache, the repository's `models/` folder; and
`weights check` says where each file was found."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from retarget.cli import main
from retarget.weights import HF_CACHE_REPOS, WeightsError, WeightsLayout, check_weights, ready_for_run


@pytest.fixture(autouse=True)
def empty_hf_cache(tmp_path, monkeypatch):
    """No test here may see the machine's own Hugging Face cache."""
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "no-hf-cache"))
    monkeypatch.delenv("HF_HOME", raising=False)
    monkeypatch.delenv("RETARGET_SD15", raising=False)


def _release_layout(tiny_weights: Path, root: Path) -> Path:
    """The tiny set rearranged as the release's README lays it out: arcface.onnx inside
    antelopev2/ (beside the insightface models), no SD 1.5 parts (those come from the HF cache)."""
    shutil.copytree(tiny_weights, root)
    (root / "antelopev2").mkdir(exist_ok=True)
    (root / "arcface.onnx").rename(root / "antelopev2" / "arcface.onnx")
    sd15 = root.parent / (root.name + "-sd15")
    sd15.mkdir()
    for part in ("vae", "scheduler", "tokenizer"):
        (root / part).rename(sd15 / part)
    return sd15


def _hf_cache(sd15: Path, hub: Path, revision: str = "451f4fe16113bff5a5d2269ed5ad43b0592e9a14") -> Path:
    snap = hub / HF_CACHE_REPOS[0] / "snapshots" / revision
    snap.parent.mkdir(parents=True)
    shutil.copytree(sd15, snap)
    (hub / HF_CACHE_REPOS[0] / "refs").mkdir()
    (hub / HF_CACHE_REPOS[0] / "refs" / "main").write_text(revision)
    return snap


def test_release_layout_with_sd15_from_the_hf_cache(tiny_weights, tmp_path, monkeypatch, capsys):
    root = tmp_path / "models"
    sd15 = _release_layout(tiny_weights, root)
    layout = WeightsLayout(root)
    with pytest.raises(WeightsError, match="vae.*no --sd15 DIR given and no SD 1.5 in the Hugging Face cache"):
        layout.require("vae")
    assert layout.require("arcface_onnx") == root / "antelopev2" / "arcface.onnx"

    hub = tmp_path / "hf-home" / "hub"
    snap = _hf_cache(sd15, hub)
    monkeypatch.delenv("HF_HUB_CACHE")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))  # $HF_HOME/hub, as huggingface_hub does
    rows = {r.entry.name: r for r in check_weights(WeightsLayout(root))}
    assert ready_for_run(list(rows.values()))
    assert rows["vae"].origin == "Hugging Face cache" and rows["vae"].path == snap / "vae"
    assert rows["arcface_onnx"].origin == "weights folder, antelopev2/"
    assert rows["exp_adapter"].origin == "weights folder"

    assert main(["weights", "check", "--weights", str(root)]) == 0
    out = capsys.readouterr().out
    assert f"Hugging Face cache: {snap / 'tokenizer'}" in out
    assert f"weights folder, antelopev2/: {root / 'antelopev2' / 'arcface.onnx'}" in out


def test_sd15_folder_option_and_the_repository_root(tiny_weights, tmp_path, capsys):
    repo = tmp_path / "Arc2Face"
    sd15 = _release_layout(tiny_weights, repo / "models")
    # --weights may name the release repository itself: its models/ folder is used
    assert main(["weights", "check", "--weights", str(repo), "--sd15", str(sd15)]) == 0
    out = capsys.readouterr().out
    assert f"weights folder: {repo / 'models'}" in out and f"--sd15: {sd15 / 'vae'}" in out
    assert main(["weights", "check", "--weights", str(repo)]) != 0
    out = capsys.readouterr().out
    assert "MISSING vae (also looked in: no --sd15 DIR given and no SD 1.5 in the Hugging Face cache" in out


def test_a_run_renders_from_the_release_layout(tiny_weights, tmp_path, monkeypatch, astronaut_rgb):
    """Not only `weights check`: the pipeline loads every part from where it was found."""
    import cv2
    import numpy as np
    import torch

    from retarget.pipeline import RetargetPipeline

    root = tmp_path / "models"
    sd15 = _release_layout(tiny_weights, root)
    _hf_cache(sd15, tmp_path / "hub")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    pipe = RetargetPipeline.from_weights(WeightsLayout(root), device="cpu", dtype=torch.float32)
    ref = RetargetPipeline.from_weights(WeightsLayout(tiny_weights), device="cpu", dtype=torch.float32)
    face = np.ascontiguousarray(astronaut_rgb[20:260, 120:360])
    vec = pipe.arcface(cv2.resize(face, (112, 112), interpolation=cv2.INTER_AREA))[0]  # antelopev2/arcface.onnx
    np.testing.assert_array_equal(vec, ref.arcface(cv2.resize(face, (112, 112), interpolation=cv2.INTER_AREA))[0])
    crop = cv2.resize(face, (pipe.image_size,) * 2, interpolation=cv2.INTER_AREA)
    exprs = np.zeros((1, 55), np.float32)
    a = pipe(pipe.make_actor(vec, crop, seed=1), exprs, seed=0, steps=1)
    b = ref(ref.make_actor(vec, crop, seed=1), exprs, seed=0, steps=1)
    np.testing.assert_array_equal(a, b)  # same files, same shapes, same process: exact


def test_incomplete_snapshot_is_skipped_for_a_complete_one(tiny_weights, tmp_path, monkeypatch):
    root = tmp_path / "models"
    sd15 = _release_layout(tiny_weights, root)
    hub = tmp_path / "hub"
    good = _hf_cache(sd15, hub, revision="b" * 40)
    broken = good.parent / ("a" * 40)
    shutil.copytree(good, broken)
    shutil.rmtree(broken / "vae")
    (hub / HF_CACHE_REPOS[0] / "refs" / "main").write_text("a" * 40)  # main names the incomplete one
    monkeypatch.setenv("HF_HUB_CACHE", str(hub))
    layout = WeightsLayout(root)
    assert layout.require("vae") == good / "vae"
    assert layout.require("tokenizer") == broken / "tokenizer"  # main's snapshot first where it has the part
