"""Fixtures for the pipeline tests: the tiny release loaded once, a stock diffusers pipeline on the same
files, an actor built from a real face (skimage astronaut) without the face detector, and the sample
clip, photo and track that the run tests share."""

from __future__ import annotations

import numpy as np
import pytest
import torch

STEPS = 3  # few steps keep the suite fast; multistep DPM++ still uses its 2nd-order updates from step 2


@pytest.fixture(scope="session")
def tiny_layout(tiny_weights):
    from retarget.weights import WeightsLayout

    return WeightsLayout(tiny_weights)


@pytest.fixture(scope="session")
def pipe(tiny_layout):
    """RetargetPipeline on the tiny weights, fp32 CPU. Tests must not leave state on it: every __call__
    sets adapters, scales and the reference mode itself."""
    from retarget.pipeline import RetargetPipeline

    return RetargetPipeline.from_weights(tiny_layout, device="cpu", dtype=torch.float32)


@pytest.fixture(scope="session")
def face_crop(astronaut_rgb) -> np.ndarray:
    """The astronaut's face region, square, 256x256 uint8 (a stand-in for an FFHQ crop)."""
    import cv2

    return np.ascontiguousarray(cv2.resize(astronaut_rgb[20:260, 120:360], (256, 256), interpolation=cv2.INTER_AREA))


@pytest.fixture(scope="session")
def arcface_vec(pipe, face_crop) -> np.ndarray:
    """(512,) unit vector: the tiny ArcFace network on the astronaut's face, resized to 112x112."""
    import cv2

    return pipe.arcface(cv2.resize(face_crop, (112, 112), interpolation=cv2.INTER_AREA))[0]


@pytest.fixture(scope="session")
def actor(pipe, arcface_vec, face_crop):
    return pipe.make_actor(arcface_vec, face_crop, seed=7)


@pytest.fixture(scope="session")
def expressions() -> np.ndarray:
    """(3, 55) float32 expression vectors in the range SMIRK produces."""
    return (np.random.default_rng(5).standard_normal((3, 55)) * 0.8).astype(np.float32)


@pytest.fixture(scope="session")
def stock_unet(tiny_layout):
    """A second, untouched copy of the Arc2Face UNet (no adapters, default processors)."""
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel.from_pretrained(tiny_layout.arc2face_unet).eval()


@pytest.fixture(scope="session")
def make_stock(pipe):
    """Factory: diffusers' StableDiffusionPipeline on our VAE, text encoder, tokenizer and a given UNet,
    with the DPM++ scheduler built from the release's config."""
    from diffusers import StableDiffusionPipeline

    from retarget.components import make_scheduler

    def make(unet):
        sd = StableDiffusionPipeline(vae=pipe.vae, text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer,
                                     unet=unet,
                                     scheduler=make_scheduler(pipe.scheduler.config, "dpm++"), safety_checker=None,
                                     feature_extractor=None, requires_safety_checker=False)
        sd.set_progress_bar_config(disable=True)
        return sd

    return make


@pytest.fixture(scope="session")
def sample_inputs(tmp_path_factory):
    """make(seconds, fps=25.0, size=160) -> (drive.mp4, actor.png) in a new folder: the sample driving
    clip (H.264 + AAC) of that length and the sample actor photo."""
    from render.storyboard import save_image
    from retarget.samples import sample_actor, write_sample_drive

    def make(seconds: float, fps: float = 25.0, size: int = 160):
        root = tmp_path_factory.mktemp("inputs")
        drive = write_sample_drive(root / "drive.mp4", seconds=seconds, fps=fps, size=size)
        actor = root / "actor.png"
        save_image(actor, sample_actor())
        return drive, actor

    return make


@pytest.fixture(scope="session")
def random_track_inputs():
    """make(root, frames, fps, seed, scale) -> (drive.mp4, actor.png, drive.track.npz) in `root`: a
    96 px sample clip of that many frames, the sample actor photo, and a track file of random
    expressions (standard normal x scale, every frame valid), so a job renders distinct frames
    without tracking."""
    from render.storyboard import save_image
    from retarget.samples import sample_actor, write_sample_drive
    from tracking.track import Track

    def make(root, frames: int, fps: float, seed: int, scale: float):
        drive = write_sample_drive(root / "drive.mp4", seconds=frames / fps, fps=fps, size=96)
        actor = root / "actor.png"
        save_image(actor, sample_actor())
        params = (np.random.default_rng(seed).standard_normal((frames, 55)) * scale).astype(np.float32)
        track = root / "drive.track.npz"
        Track(raw=params, params=params, valid=np.ones(frames, bool), times=np.arange(frames) / fps,
              fps=fps).save(track)
        return drive, actor, track

    return make


@pytest.fixture(scope="session")
def track_of(tiny_weights, tmp_path_factory):
    """track(drive) -> the path of a track file of that clip (default tracking options, tiny SMIRK)."""
    from tracking.tracker import TrackOptions, track_video

    def track(drive):
        path = tmp_path_factory.mktemp("track") / "drive.track.npz"
        track_video(drive, smirk_path=tiny_weights / "smirk/SMIRK_em1.pt", options=TrackOptions(),
                    progress=False).save(path)
        return path

    return track


class _PipelineKiller:
    """`kill_pipeline(n)`: the pipeline's n-th call from now (counting from 1) raises
    `kill_pipeline.Killed`, as if the job were killed there; `kill_pipeline.revive()` puts the real
    call back (for the --resume that follows)."""

    class Killed(Exception):
        pass

    def __init__(self, monkeypatch):
        from retarget import pipeline as pipeline_mod

        self._cls, self._monkeypatch = pipeline_mod.RetargetPipeline, monkeypatch
        self._original = self._cls.__call__

    def __call__(self, on_call: int) -> None:
        original, killed, calls = self._original, self.Killed, [0]

        def dying(pipe, *a, **kw):
            calls[0] += 1
            if calls[0] == on_call:
                raise killed()
            return original(pipe, *a, **kw)

        self._monkeypatch.setattr(self._cls, "__call__", dying)

    def revive(self) -> None:
        self._monkeypatch.setattr(self._cls, "__call__", self._original)


@pytest.fixture
def kill_pipeline(monkeypatch) -> _PipelineKiller:
    return _PipelineKiller(monkeypatch)
