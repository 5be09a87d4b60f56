"""tracking.smirk: the SMIRK expression encoder loads release-format checkpoints strictly,
reproduces its outputs after a save/load round trip, batches exactly, and fails clearly."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from render.errors import RetargetError
from tracking.smirk import CHECKPOINT_PREFIX, ExpressionEncoder, load_smirk_encoder, weights_identity


def release_state_dict(model: ExpressionEncoder) -> dict:
    """What the released SMIRK_em1.pt holds: every encoder under `smirk_encoder.`, plus the generator."""
    sd = {CHECKPOINT_PREFIX + k: v.clone() for k, v in model.state_dict().items()}
    sd["smirk_encoder.pose_encoder.pose_cam_layers.0.weight"] = torch.randn(6, 576)
    sd["smirk_encoder.shape_encoder.shape_layers.0.bias"] = torch.randn(300)
    sd["smirk_generator.encoder.enc1.conv.weight"] = torch.randn(4, 6, 3, 3)
    return sd


@pytest.fixture(scope="module")
def random_encoder() -> ExpressionEncoder:
    torch.manual_seed(0)
    model = ExpressionEncoder()
    # Perturb batch-norm statistics too, so a loader that skipped buffers would be caught.
    with torch.no_grad():
        for name, buf in model.named_buffers():
            if name.endswith("running_mean"):
                buf.copy_(torch.randn_like(buf) * 0.1)
            elif name.endswith("running_var"):
                buf.copy_(torch.rand_like(buf) + 0.5)
    return model.eval()


@pytest.fixture(scope="module")
def crops() -> torch.Tensor:
    return torch.rand(4, 3, 224, 224, generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def checkpoint(random_encoder, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("smirk") / "SMIRK_em1.pt"
    torch.save(release_state_dict(random_encoder), path)
    return path


def test_round_trip_reproduces_outputs_exactly(random_encoder, checkpoint, crops, tmp_path):
    with torch.no_grad():
        expected = ExpressionEncoder.to_adapter_vector(random_encoder(crops))
    loaded = load_smirk_encoder(checkpoint)
    assert not loaded.training
    with torch.no_grad():
        got = ExpressionEncoder.to_adapter_vector(loaded(crops))
    assert torch.equal(got, expected)
    # The same tensors wrapped in a dict, or as safetensors, load to the same outputs.
    from safetensors.torch import save_file

    wrapped = tmp_path / "wrapped.bin"
    torch.save({"state_dict": release_state_dict(random_encoder)}, wrapped)
    st = tmp_path / "smirk.safetensors"
    save_file({k: v.contiguous() for k, v in release_state_dict(random_encoder).items()}, str(st))
    for path in (wrapped, st):
        with torch.no_grad():
            assert torch.equal(ExpressionEncoder.to_adapter_vector(load_smirk_encoder(path)(crops)), expected)


def test_outputs_follow_the_release_layout(random_encoder, crops):
    with torch.no_grad():
        out = random_encoder(crops)
        raw = random_encoder.expression_layers(
            torch.nn.functional.adaptive_avg_pool2d(random_encoder.encoder(crops)[-1], 1).flatten(1))
    vec = ExpressionEncoder.to_adapter_vector(out)
    assert vec.shape == (4, 55)
    assert torch.equal(vec[:, :50], raw[:, :50])
    assert torch.equal(vec[:, 50:52], raw[:, 50:52].clamp(0, 1))
    assert torch.equal(vec[:, 52], raw[:, 52].clamp(min=0))
    assert torch.equal(vec[:, 53:], raw[:, 53:].clamp(-0.2, 0.2))
    # The test weights push raw values past the clamps, so the clamps were really exercised.
    assert (raw[:, 50:52] > 1).any() or (raw[:, 50:52] < 0).any()
    assert (raw[:, 53:].abs() > 0.2).any()


def test_batch_equals_single_calls(random_encoder, crops):
    # Tolerance: float32 convolutions may sum in another order for other batch sizes; 1e-5 of
    # the largest output (random weights give outputs in the thousands).
    batched = random_encoder.encode(crops)
    single = np.concatenate([random_encoder.encode(crops[i:i + 1]) for i in range(len(crops))])
    np.testing.assert_allclose(batched, single, rtol=0, atol=1e-5 * np.abs(single).max())


def test_uint8_crops_are_divided_by_255(random_encoder):
    rng = np.random.default_rng(2)
    u8 = rng.integers(0, 256, (2, 224, 224, 3), dtype=np.uint8)
    as_float = u8.astype(np.float32) / 255.0
    ref = random_encoder.encode(as_float)
    np.testing.assert_allclose(random_encoder.encode(u8), ref, rtol=0, atol=1e-5 * np.abs(ref).max())
    with pytest.raises(RetargetError, match="224"):
        random_encoder.encode(np.zeros((1, 112, 112, 3), np.uint8))


def test_tiny_release_file_loads(tiny_weights):
    path = tiny_weights / "smirk" / "SMIRK_em1.pt"
    model = load_smirk_encoder(path)
    out = model.encode(np.full((1, 224, 224, 3), 128, np.uint8))
    assert out.shape == (1, 55) and out.dtype == np.float32 and np.isfinite(out).all()
    ident = weights_identity(path)
    assert ident.startswith("SMIRK_em1.pt:sha256:") and len(ident.split(":")[-1]) == 16


@pytest.mark.parametrize("case", ["missing_key", "wrong_shape", "truncated", "not_smirk", "absent", "garbage"])
def test_bad_checkpoints_raise_one_clear_error(case, random_encoder, checkpoint, tmp_path):
    path = tmp_path / "SMIRK_em1.pt"
    sd = release_state_dict(random_encoder)
    if case == "missing_key":
        del sd[CHECKPOINT_PREFIX + "expression_layers.0.bias"]
        torch.save(sd, path)
    elif case == "wrong_shape":
        sd[CHECKPOINT_PREFIX + "expression_layers.0.weight"] = torch.zeros(53, 960)
        torch.save(sd, path)
    elif case == "truncated":
        data = checkpoint.read_bytes()
        path.write_bytes(data[: len(data) // 3])
    elif case == "not_smirk":
        torch.save({"unet.conv_in.weight": torch.zeros(2, 2)}, path)
    elif case == "garbage":
        path.write_bytes(b"definitely not a checkpoint" * 10)
    with pytest.raises(RetargetError) as e:
        load_smirk_encoder(path)
    msg = str(e.value)
    assert str(path) in msg and "SMIRK authors" in msg and "\n" not in msg
    if case == "wrong_shape":
        assert "(53, 960)" in msg
    if case == "missing_key":
        assert "missing" in msg
