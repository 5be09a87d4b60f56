"""The weights layer: layout resolution, checks on good, missing and broken files, tiny set loaders."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from retarget.weights import (
    RELEASE, RUN, WeightsError, WeightsLayout, check_weights, ready_for_run, resolve_weights_dir,
    safetensors_shapes, torch_state_shapes,
)


@pytest.fixture
def tiny_copy(tiny_weights, tmp_path) -> Path:
    """A private copy of the tiny set that a test may damage."""
    dst = tmp_path / "w"
    shutil.copytree(tiny_weights, dst)
    return dst


def test_resolve_order(monkeypatch, tmp_path):
    monkeypatch.setenv("RETARGET_WEIGHTS", str(tmp_path / "env"))
    assert resolve_weights_dir(str(tmp_path / "arg")) == tmp_path / "arg"
    assert resolve_weights_dir(None) == tmp_path / "env"
    monkeypatch.delenv("RETARGET_WEIGHTS")
    assert resolve_weights_dir(None) == Path("~/.cache/retarget/weights").expanduser()


def test_tiny_set_passes_every_run_check(tiny_weights):
    rows = check_weights(WeightsLayout(tiny_weights))
    by = {r.entry.name: r for r in rows}
    for entry in RELEASE:
        if entry.needed_for == RUN:
            assert by[entry.name].status == "ok", by[entry.name].detail
    assert by["lcm_lora"].status == "ok"
    assert ready_for_run(rows)


def test_empty_folder_names_each_missing_file(tmp_path):
    rows = check_weights(WeightsLayout(tmp_path))
    assert not ready_for_run(rows)
    assert {r.entry.name for r in rows if r.status == "missing"} == {e.name for e in RELEASE}


def test_require_names_file_source_and_licence(tmp_path):
    with pytest.raises(WeightsError) as e:
        WeightsLayout(tmp_path).require("exp_adapter")
    msg = str(e.value)
    assert "exp_adapter/exp_adapter.bin" in msg and "FoivosPar/Arc2Face" in msg and "MIT" in msg
    assert "\n" not in msg


def _truncate(path: Path, keep: float = 0.5) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


@pytest.mark.parametrize("member", [
    "arc2face/diffusion_pytorch_model.safetensors",
    "encoder/pytorch_model.bin",
    "exp_adapter/exp_adapter.bin",
    "ref_adapter/pytorch_lora_weights.safetensors",
    "smirk/SMIRK_em1.pt",
    "arcface.onnx",
])
def test_truncated_file_is_named(tiny_copy, member):
    _truncate(tiny_copy / member)
    rows = check_weights(WeightsLayout(tiny_copy))
    bad = [r for r in rows if r.status == "bad"]
    assert len(bad) == 1 and member in bad[0].detail, [r.detail for r in bad]
    assert not ready_for_run(rows)


def test_wrong_shape_exp_adapter_is_named(tiny_copy):
    import torch

    path = tiny_copy / "exp_adapter/exp_adapter.bin"
    sd = torch.load(path, weights_only=True)
    sd["image_proj"]["proj.weight"] = sd["image_proj"]["proj.weight"][:, :54]
    torch.save(sd, path)
    rows = check_weights(WeightsLayout(tiny_copy))
    (bad,) = [r for r in rows if r.status == "bad"]
    assert "exp_adapter.bin" in bad.detail and "54" in bad.detail


def test_wrong_smirk_head_is_named(tiny_copy):
    import torch

    path = tiny_copy / "smirk/SMIRK_em1.pt"
    sd = torch.load(path, weights_only=True)
    sd["smirk_encoder.expression_encoder.expression_layers.0.weight"] = torch.zeros(53, 960)
    torch.save(sd, path)
    (bad,) = [r for r in check_weights(WeightsLayout(tiny_copy)) if r.status == "bad"]
    assert "SMIRK_em1.pt" in bad.detail


def test_safetensors_header_reader_matches_library(tiny_weights):
    from safetensors import safe_open

    path = tiny_weights / "ref_adapter/pytorch_lora_weights.safetensors"
    shapes = safetensors_shapes(path)
    with safe_open(str(path), "pt") as f:
        assert {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()} == shapes


def test_torch_shapes_flatten_nested_dicts(tiny_weights):
    shapes = torch_state_shapes(tiny_weights / "exp_adapter/exp_adapter.bin")
    assert shapes["image_proj.proj.weight"][1] == 55
    assert any(k.startswith("ip_adapter.1.to_k_ip") for k in shapes)


def test_download_fetches_hub_files_into_the_layout(tmp_path, monkeypatch):
    """`weights download` asks the hub for each hosted file and lands it at its layout path;
    the gated files come back as instructions. The hub is replaced by a local fake."""
    import huggingface_hub

    from retarget.weights import BY_NAME, download_weights

    asked = []

    def fake_file(repo, member, local_dir):
        asked.append((repo, member))
        dest = Path(local_dir) / member
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.write_bytes(b"x")
        return str(dest)

    def fake_snapshot(repo, allow_patterns, local_dir):
        for pattern in allow_patterns:
            fake_file(repo, pattern, local_dir)
        return str(local_dir)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake_file)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot)
    layout = WeightsLayout(tmp_path)
    gated = download_weights(layout, progress=lambda *_: None)
    for entry in RELEASE:
        if entry.hf:
            assert layout.exists(entry.name), entry.path
    assert ("latent-consistency/lcm-lora-sdv1-5", "pytorch_lora_weights.safetensors") in asked
    assert (tmp_path / "lcm_lora/pytorch_lora_weights.safetensors").is_file()
    assert not (tmp_path / "arc2face/diffusion_pytorch_model.bin").exists()  # one format per folder
    assert {g.split(":")[0] for g in gated} == {e.path for e in RELEASE if e.hf is None}
    assert any("flame.is.tue.mpg.de" in g for g in gated) and BY_NAME["smirk_ckpt"].path in "".join(gated)
    n = len(asked)
    download_weights(layout, progress=lambda *_: None)
    assert len(asked) == n  # present files are not fetched again
