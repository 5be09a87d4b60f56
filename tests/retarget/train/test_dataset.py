"""`retarget dataset build` on the sample clip: item count, field validity against the tracker and the
pipeline's identity path, pairs, skipped faces, corrupt sources, no half-written output."""

from __future__ import annotations

import json

import numpy as np
import pytest

from render.errors import RetargetError
from tests.retarget.train.conftest import CLIP_SECONDS, SAMPLE_FPS


def test_build_counts_and_reports_the_corrupt_video(built):
    out, code, stdout = built
    assert code == 0
    manifest = json.loads((out / "manifest.json").read_text())
    summary = manifest["summary"]
    # 2 s at 25 fps sampled at 5 per second: frames at 0, 0.2, ..., 1.8 s; every one shows the face.
    expected = int(CLIP_SECONDS * SAMPLE_FPS)
    assert summary["frames"] == expected and summary["items"] == expected == len(manifest["items"])
    assert summary["skipped_blurry"] == summary["skipped_tiny"] == summary["skipped_no_face"] == 0
    assert [c["path"].endswith("broken.mp4") for c in summary["corrupt"]] == [True]
    assert "CORRUPT, skipped" in stdout and "broken.mp4" in stdout
    assert "CORRUPT" in (out / "summary.txt").read_text()
    times = [it["time_s"] for it in manifest["items"]]
    np.testing.assert_allclose(times, np.arange(expected) / SAMPLE_FPS, atol=1e-3)
    assert sum(s["count"] for s in manifest["shards"]) == expected
    assert not list(out.parent.glob(".data.partial-*"))


def test_fields_match_the_tracker_and_the_identity_path(built, sample_clip, tiny_weights):
    import torch

    from retarget.pipeline import RetargetPipeline
    from retarget.train.data import TrainData
    from retarget.weights import WeightsLayout
    from render.video import open_video
    from tracking.tracker import TrackOptions, track_video

    data = TrainData(built[0])
    assert len(data) == int(CLIP_SECONDS * SAMPLE_FPS)
    item = data[0]
    assert item["image"].shape == (512, 512, 3) and item["image"].dtype == np.uint8
    assert item["arcface"].shape == (512,) and abs(np.linalg.norm(item["arcface"]) - 1) < 1e-5
    assert item["exp"].shape == (55,) and np.isfinite(item["exp"]).all()
    assert item["meta"]["source"] == str(sample_clip) and item["meta"]["frame"] == 0
    # SMIRK vector: what `retarget track` computes for frame 0 (same dlib landmarks, crop and encoder).
    layout = WeightsLayout(tiny_weights)
    track = track_video(sample_clip, smirk_path=layout.smirk_ckpt, progress=False,
                        options=TrackOptions(max_frames=1, smoothing="none", device="cpu"))
    # fp32 across batch shapes and CPUs moves tracked values by ~2e-5 of their size (GUIDE); the tiny
    # random encoder's outputs reach ~200, so the tolerance scales with the largest value.
    np.testing.assert_allclose(item["exp"], track.raw[0], rtol=0, atol=2e-5 * max(1.0, np.abs(track.raw[0]).max()))
    # ArcFace vector and crop: what the pipeline's actor preparation computes from the same frame.
    frame = next(iter(open_video(sample_clip))).rgb
    pipe = RetargetPipeline.from_weights(layout, device="cpu", dtype=torch.float32)
    actor = pipe.prepare_actor(frame, seed=0)
    np.testing.assert_allclose(item["arcface"], actor.arcface, atol=1e-5)
    assert np.abs(item["image"].astype(int) - actor.crop.astype(int)).max() == 0  # PNG is lossless


def test_pairs_are_same_video_different_expressions(built):
    from retarget.train.data import TrainData

    data = TrainData(built[0])
    opts = data.manifest["options"]
    assert len(data.pairs) > 0
    assert len(data.pairs) <= opts["pairs_per_frame"] * len(data)
    exps = np.stack([data[i]["exp"] for i in range(len(data))])
    for ref, tgt in data.pairs:
        assert ref != tgt
        assert data.items[ref]["video"] == data.items[tgt]["video"] is not None
        assert np.linalg.norm(exps[ref] - exps[tgt]) >= opts["min_pair_distance"]


def test_blurry_and_tiny_faces_are_skipped_and_counted(tmp_path, sample_clip, tiny_weights):
    import cv2

    from render.storyboard import save_image
    from render.video import open_video
    from retarget.train.dataset_build import DatasetOptions, build_dataset

    frame = next(iter(open_video(sample_clip))).rgb
    save_image(tmp_path / "sharp.png", frame)
    save_image(tmp_path / "blurry.png", cv2.GaussianBlur(frame, (0, 0), 2))
    # The face spans ~110 px of the 256 px frame: at 1.6x it passes --min-face 150, at 1x it does not.
    save_image(tmp_path / "big.png", cv2.resize(frame, (410, 410), interpolation=cv2.INTER_CUBIC))
    (tmp_path / "notes.txt").write_text("not a picture")
    s = build_dataset([tmp_path], tmp_path / "out", weights=tiny_weights, progress=False,
                      options=DatasetOptions(min_face=150, device="cpu"))
    assert (s.photos, s.items, s.skipped_tiny) == (3, 1, 2)  # sharp.png and blurry.png are too small
    assert [p.endswith("notes.txt") for p in s.ignored_files] == [True]
    s = build_dataset([tmp_path / "sharp.png", tmp_path / "blurry.png"], tmp_path / "out2", weights=tiny_weights,
                      progress=False, options=DatasetOptions(device="cpu"))
    assert (s.items, s.skipped_blurry, s.pairs) == (1, 1, 0)  # photos make no Reference Adapter pairs
    assert s.ignored_files == []


def test_refuses_a_non_empty_output_and_leaves_nothing_when_no_face(tmp_path, tiny_weights):
    from render.storyboard import save_image
    from retarget.train.dataset_build import build_dataset

    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    save_image(tmp_path / "grey.png", np.full((128, 128, 3), 128, np.uint8))
    with pytest.raises(RetargetError, match="not empty"):
        build_dataset([tmp_path / "grey.png"], tmp_path / "out", weights=tiny_weights, progress=False)
    assert (tmp_path / "out" / "keep.txt").read_text() == "mine"
    with pytest.raises(RetargetError, match="no usable face"):
        build_dataset([tmp_path / "grey.png"], tmp_path / "new", weights=tiny_weights, progress=False)
    assert not (tmp_path / "new").exists() and not list(tmp_path.glob(".new.partial-*"))
