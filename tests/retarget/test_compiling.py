"""Compile where it pays (retarget/compiling.py): the padded last batch, compiled == eager, the
--compile auto decision, the persistent cache and its corrupt files (fp32 CPU, tiny weights).

Tolerances: padding a batch changes the GEMM shapes the rows go through (B rows -> batch rows), so a
real frame moves by fp32 summation order only (~1e-6 on pixels in [0, 1]; PAD_ATOL allows 1e-5). Its
initial noise must be exactly what it is unpadded (it depends only on (seed, frame index)): compared
with torch.equal.
"""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
import torch

from render.errors import RetargetError
from retarget import compiling
from retarget.compiling import CompileCache, CompiledBatches, choose, pad_indices
from retarget.run import RunOptions, RunSummary, _render_with_backoff

from .conftest import STEPS

PAD_ATOL = 1e-5  # other GEMM shapes, same arithmetic: fp32 rounding (pixels in [0, 1])
COMPILED_ATOL = 1e-5  # dynamo + AOTAutograd's decomposed graph run eagerly: fp32 rounding


@pytest.fixture(scope="module")
def clip():
    """(7, 55) expressions: a 'video' of 7 frames, rendered in batches of 4 (the last one short)."""
    return (np.random.default_rng(11).standard_normal((7, 55)) * 0.8).astype(np.float32)


def _call(**kw):
    return dict(dict(steps=STEPS, guidance=3.0, exp_scale=1.0, ref_strength=0.8, scheduler="dpm++", seed=5,
                     per_frame_noise=True, output_type="float"), **kw)


class _NoCompile(CompiledBatches):
    """The padding of CompiledBatches on the eager pipeline (nothing wrapped): what padding alone does."""

    def __init__(self, pipe, batch):
        super().__init__(pipe, batch, "k", CompileCache("/nonexistent-compile-cache"), log=lambda *_: None)
        self._warm = True

    def _after(self, seconds):
        self.calls += 1


def test_pad_indices():
    assert pad_indices([4, 5, 6], 4) == [4, 5, 6, 6]
    assert pad_indices([0, 1, 2, 3], 4) == [0, 1, 2, 3]
    assert pad_indices([9], 3) == [9, 9, 9]


@pytest.mark.parametrize("per_frame", [True, False])
def test_padding_keeps_every_real_frames_noise(pipe, per_frame):
    """The padded batch's real rows draw exactly the unpadded batch's initial noise, and (LCM) their
    per-step generators are in the same state."""
    idx = [4, 5, 6]
    padded = pad_indices(idx, 4)
    lat, gens = pipe._initial_noise(len(idx), None, 5, per_frame, idx)
    lat_p, gens_p = pipe._initial_noise(len(padded), None, 5, per_frame, padded)
    assert torch.equal(lat_p[:3], lat)
    assert all(torch.equal(a.get_state(), b.get_state()) for a, b in zip(gens, gens_p[:3]))
    if per_frame:  # the padding row is the last frame's own noise; other frames differ
        assert torch.equal(lat_p[3], lat[2]) and not torch.equal(lat[0], lat[1])


@pytest.mark.parametrize("scheduler", ["dpm++", "lcm"])
def test_padded_last_batch_gives_the_unpadded_frames(pipe, actor, clip, scheduler):
    """Frames 4..6 rendered as a batch padded to 4 == the same frames rendered as a batch of 3."""
    call = _call(scheduler=scheduler, **({"steps": 2, "guidance": 1.0} if scheduler == "lcm" else {}))
    idx = [4, 5, 6]
    plain = np.stack(_render_with_backoff(pipe, actor, clip, idx, call))
    padder = _NoCompile(pipe, 4)
    padded = np.stack(_render_with_backoff(pipe, actor, clip, idx, call, padder))
    assert padded.shape == plain.shape == (3, pipe.image_size, pipe.image_size, 3)
    np.testing.assert_allclose(padded, plain, rtol=0, atol=PAD_ATOL)
    # and a full batch goes through unpadded, unchanged
    full = np.stack(_render_with_backoff(pipe, actor, clip, [0, 1, 2, 3], call, padder))
    np.testing.assert_allclose(full[1:3], np.stack(_render_with_backoff(pipe, actor, clip, [1, 2], call)),
                               rtol=0, atol=PAD_ATOL)


def test_compiled_equals_eager_and_one_compile_serves_the_clip(pipe, actor, clip, tmp_path, monkeypatch):
    """The whole 7-frame clip through the compiled UNet in batches of 4: the padded last batch compiles
    nothing new (a batch of 3 unpadded does: the counter sees recompiles), and the frames equal eager.

    Backend aot_eager (dynamo's graph capture + AOTAutograd, run eagerly): inductor's C++ compile of the
    tiny UNet takes ~90 s cold on the 2-core CI CPU (warm 8 s), too slow for a test; the capture, the
    guards that decide recompiles and the padding are what this test is about."""
    from torch._dynamo.backends.registry import lookup_backend

    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "elsewhere"))  # restored afterwards
    aot = lookup_backend("aot_eager")
    graphs = []

    def counting(gm, example_inputs):
        graphs.append(len(example_inputs))
        return aot(gm, example_inputs)

    call = _call(steps=2)
    eager = np.concatenate([np.stack(_render_with_backoff(pipe, actor, clip, list(range(s, min(7, s + 4))), call))
                            for s in (0, 4)])
    cache = CompileCache(tmp_path / "compile")
    run = CompiledBatches(pipe, 4, "tiny-b4", cache, log=lambda *_: None, backend=counting)
    torch._dynamo.reset()
    try:
        run.enable()
        first = np.stack(_render_with_backoff(pipe, actor, clip, [0, 1, 2, 3], call, run))
        compiled_once = len(graphs)
        last = np.stack(_render_with_backoff(pipe, actor, clip, [4, 5, 6], call, run))
        assert compiled_once >= 1 and len(graphs) == compiled_once, "the padded last batch recompiled"
        np.testing.assert_allclose(np.concatenate([first, last]), eager, rtol=0, atol=COMPILED_ATOL)
        assert "tiny-b4" in cache.index() and run.calls == 2
        # control: the same short batch without padding is a new shape
        np.stack(_render_with_backoff(pipe, actor, clip, [4, 5, 6], call))  # the compiled UNet, 3 rows
        assert len(graphs) > compiled_once
    finally:
        pipe.compile_unet(None)
        torch._dynamo.reset()


def test_compile_unet_options_spell_out_the_modes_settings(pipe, monkeypatch):
    """torch.compile takes a mode or options, not both: with options, compile_unet hands torch the mode's
    own settings (reduce-overhead: CUDA graphs) merged with them, the options winning; without, the mode."""
    seen = []
    monkeypatch.setattr(torch, "compile", lambda model, **kw: seen.append(kw) or model)
    try:
        pipe.compile_unet("reduce-overhead", options={"epilogue_fusion": False, "triton.cudagraphs": False},
                          dynamic=False)
        pipe.compile_unet("reduce-overhead", dynamic=False)
        pipe.compile_unet("max-autotune", options={"coordinate_descent_tuning": False})
    finally:
        pipe.compile_unet(None)
    assert seen[0] == {"options": {"triton.cudagraphs": False, "epilogue_fusion": False}, "dynamic": False}
    assert seen[1] == {"mode": "reduce-overhead", "dynamic": False}
    assert seen[2]["options"]["max_autotune"] is True and seen[2]["options"]["coordinate_descent_tuning"] is False
    assert pipe._compiled_unet is None


# --------------------------------------------------------------------------- the decision

GPU = dict(device="cuda", mode="quality", batch=32, steps=25)


@pytest.mark.parametrize("setting, kw, on, clause", [
    ("auto", dict(GPU, device="cpu", frames=10_000), False, ""),
    ("on", dict(GPU, device="cpu", frames=10_000), False, "eager (--compile on: no GPU"),
    ("auto", dict(GPU, frames=40), False, "eager (auto: compile would not pay for 40 frames"),
    ("auto", dict(GPU, frames=2, batch=1), False, "eager (auto: compile cannot pay for 2 frames)"),
    ("auto", dict(GPU, frames=1000, warm=True), True, "compiled (auto: ~"),
    ("auto", dict(GPU, frames=1000), False, "cold compile"),  # 1000 x 43 ms = 43 s < 85 s cold
    ("auto", dict(GPU, frames=4000), True, "cold compile"),
    ("auto", dict(GPU, frames=100, batch=1), True, "compiled (auto:"),  # B=1: 1.2 s a frame saved
    ("on", dict(GPU, frames=5), True, "compiled (--compile on)"),
    ("off", dict(GPU, frames=10_000, warm=True), False, "eager (--compile off)"),
    ("auto", dict(GPU, frames=10_000, remote=True), False, ""),
    ("on", dict(GPU, frames=10_000, remote=True), False, "eager (Ray workers render eagerly)"),
    ("auto", dict(GPU, frames=10, previous=True), True, "compiled (auto: as the resumed work folder)"),
    ("auto", dict(GPU, frames=10_000, warm=True, previous=False), False, "eager (auto: as the resumed"),
])
def test_auto_decision(setting, kw, on, clause):
    choice = choose(setting, **kw)
    assert choice.on is on
    assert choice.note.startswith(clause) if clause.startswith(("eager", "compiled")) else clause in choice.note
    if not clause:
        assert choice.note == ""


def test_auto_decision_arithmetic():
    """saving = frames x eager - padded frames x compiled; cost = warm (measured when known) or cold."""
    eager, compiled = compiling.seconds_per_frame("quality", 32, 25)
    c = choose("auto", **dict(GPU, frames=1000, warm=True))
    assert c.saving_s == pytest.approx(1000 * eager - 1024 * compiled)
    assert c.cost_s == compiling.COMPILE_S["warm"]
    assert f"~{c.saving_s:.0f} s saved for ~{c.cost_s:.0f} s cached compile" in c.note
    assert choose("auto", **dict(GPU, frames=1000, warm=True, warm_s=3.0)).cost_s == 3.0
    # half the steps, half the saving; fast mode uses its own row
    half = choose("auto", **dict(GPU, frames=1000, warm=True, steps=12))
    assert half.saving_s == pytest.approx(c.saving_s * 12 / 25)
    assert compiling.seconds_per_frame("fast", 8, 4) == compiling.SPEED["fast"]["rows"][8]
    assert compiling.seconds_per_frame("quality", 20, 25) == compiling.SPEED["quality"]["rows"][8]
    with pytest.raises(RetargetError, match="--compile"):
        choose("sometimes", **dict(GPU, frames=10))


@pytest.mark.parametrize("setting, kw, on, clause", [
    ("auto", dict(device="cpu", frames=100_000), False, ""),
    ("on", dict(device="cpu", frames=100_000), False, ""),
    ("on", dict(device="cuda", frames=5), True, ""),  # choose's "compiled (--compile on)" says it for both
    ("off", dict(device="cuda", frames=100_000, warm=True), False, ""),
    ("auto", dict(device="cuda", frames=100_000, remote=True), False, ""),
    ("auto", dict(device="cuda", frames=1000), False, "eager (auto: ~7 s saved for ~25 s cold compile)"),
    ("auto", dict(device="cuda", frames=5000), True, "compiled (auto: ~34 s saved for ~25 s cold compile)"),
    ("auto", dict(device="cuda", frames=2000, warm=True), True, "compiled (auto: ~14 s saved for ~8 s cached"),
    ("auto", dict(device="cuda", frames=2000, warm=True, warm_s=20.0), False, "eager (auto: ~14 s saved for ~20 s"),
    ("auto", dict(device="cuda", frames=10, previous=True), True, "compiled (auto: as the resumed work folder)"),
])
def test_decoder_decision(setting, kw, on, clause):
    """The decoder's saving is frames x (eager - compiled) decode seconds (13.2 -> 6.4 ms a frame), in
    any mode; its cost is a fifth of the UNet's compile, so it pays for jobs the UNet's does not."""
    c = compiling.choose_decoder(setting, **kw)
    assert c.on is on and c.note.startswith(clause) and (clause or c.note == "")
    unet = choose(setting, **dict(GPU, mode="fast", batch=32, steps=4, **kw)) if kw["device"] == "cuda" else None
    if setting == "auto" and kw.get("frames") == 5000 and not kw.get("warm"):
        assert unet is not None and not unet.on  # 5000 fast frames: the decoder pays, the UNet does not


def test_decode_chunk_is_the_pipelines():
    from retarget.pipeline import DECODE_BATCH

    assert compiling.DECODE_CHUNK == DECODE_BATCH
    assert [compiling.decode_rows(b) for b in (1, 8, 16, 32)] == [1, 8, 16, 16]


def test_summary_line_says_the_decision(tmp_path):
    s = RunSummary(frames=100, rendered=100, seconds=10.0, invalid_frames=0, output=tmp_path / "o.mp4",
                   compile="compiled (auto: ~95 s saved for ~20 s cached compile)")
    assert "(10.00 frames/s), compiled (auto: ~95 s saved for ~20 s cached compile), 0 driving" in s.line()
    assert "compile" not in RunSummary(frames=1, rendered=1, seconds=1.0, invalid_frames=0,
                                       output=tmp_path / "o.mp4").line()


def test_compile_option_checks():
    from retarget.cliargs import check_options

    with pytest.raises(RetargetError, match="--compile on needs a GPU"):
        check_options(RunOptions(device="cpu", compile="on"))
    with pytest.raises(RetargetError, match="--compile: choose one of auto, on, off"):
        check_options(RunOptions(compile="yes"))
    check_options(RunOptions(device="cpu", compile="off"))


def test_cli_has_compile_for_run_and_transition_only():
    from retarget.cli import build_parser

    parser = build_parser()
    assert parser.parse_args(["run", "d.mp4", "a.jpg", "-o", "o.mp4", "--compile", "off"]).compile == "off"
    assert parser.parse_args(["run", "d.mp4", "a.jpg", "-o", "o.mp4"]).compile == "auto"
    assert parser.parse_args(["transition", "a.jpg", "k.yaml", "-o", "o.mp4", "--compile", "on"]).compile == "on"
    with pytest.raises(SystemExit):
        parser.parse_args(["storyboard", "a.jpg", "-o", "s.png", "--compile", "on"])


def test_resume_follows_the_work_folders_choice(tmp_path):
    m = tmp_path / "manifest.json"
    assert compiling.previous_choice(m) is None
    m.write_text(json.dumps({"batch": 4, "compiled": True}))
    assert compiling.previous_choice(m) is True
    m.write_text(json.dumps({"batch": 4}))  # made eagerly (or before --compile existed)
    assert compiling.previous_choice(m) is False
    m.write_text("{not json")
    assert compiling.previous_choice(m) is None
    m.write_text(json.dumps({"batch": 4, "decoder_compiled": True}))
    assert (compiling.previous_choice(m), compiling.previous_choice(m, "decoder")) == (False, True)


# --------------------------------------------------------------------------- the cache

def test_cache_folder_env_override(tmp_path, monkeypatch):
    monkeypatch.setenv(compiling.ENV, str(tmp_path / "mine"))
    assert compiling.cache_folder() == tmp_path / "mine"
    assert CompileCache().inductor == tmp_path / "mine" / "inductor"
    monkeypatch.delenv(compiling.ENV)
    from platformdirs import user_cache_dir

    assert compiling.cache_folder() == compiling.Path(user_cache_dir("retarget")) / "compile"


def test_configure_points_inductor_into_the_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "before"))
    cache = CompileCache(tmp_path / "c")
    cache.configure()
    from torch._inductor.runtime.cache_dir_utils import cache_dir

    assert cache_dir() == str(tmp_path / "c" / "inductor") and cache.artifacts.is_dir()


def test_shape_key_separates_what_recompiles():
    base = dict(torch_version="2.11", gpu="NVIDIA H100", dtype="torch.float16", batch=32, image_size=512,
                call=dict(scheduler="dpm++", guidance=3.0, ref_strength=0.8))
    k = compiling.shape_key(**base)
    assert k == compiling.shape_key(**base) and "/" not in k and " " not in k
    for change in (dict(batch=16), dict(gpu="NVIDIA H200"), dict(torch_version="2.12"), dict(dtype="torch.bfloat16"),
                   dict(call=dict(scheduler="lcm", guidance=1.0, ref_strength=0.8))):
        assert compiling.shape_key(**dict(base, **change)) != k


def test_corrupt_cache_files_are_dropped_with_a_warning(tmp_path):
    cache = CompileCache(tmp_path)
    cache.artifacts.mkdir(parents=True)
    bad = cache.artifact_path("k1")
    bad.write_bytes(b"\x00 not a torch cache artifact")
    assert cache.has("k1")  # present: it would count as warm
    with pytest.warns(UserWarning, match="corrupt"):
        assert cache.load_artifacts("k1") is False
    assert not bad.exists() and not cache.has("k1")
    cache.index_path.write_text("{truncated")
    with pytest.warns(UserWarning, match="unreadable"):
        assert not cache.has("k2")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cache.record("k2", warm_s=4.5)  # rewrites the index
    assert cache.has("k2") and cache.measured_s("k2") == 4.5


class _FakePipe:
    """compile_unet / compile_decoder record their calls: the fallback logic without a real compile."""

    def __init__(self):
        self.compiles = []
        self.decoder_compiles = []
        self._compiled_unet = None
        self._compiled_decode = None

    def compile_unet(self, mode=None, **kw):
        self.compiles.append(mode)
        self._compiled_unet = None if mode is None else object()

    def compile_decoder(self, mode=None, rows=16, **kw):
        self.decoder_compiles.append((mode, rows))
        self._compiled_decode = None if mode is None else object()


@pytest.mark.parametrize("fails", [1, 2])
def test_a_failing_compile_falls_back_not_crashes(tmp_path, monkeypatch, fails):
    """A first call that fails (a corrupt inductor cache, a compiler bug) clears the cache and compiles
    fresh; failing again, the job goes on eagerly. Either way the frames come back and a warning says so."""
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "x"))
    cache = CompileCache(tmp_path / "c")
    cache.configure()
    (cache.inductor / "stale").write_text("garbage")
    pipe = _FakePipe()
    run = CompiledBatches(pipe, 4, "k", cache, log=lambda *_: None, note="compiled (--compile on)")
    run.enable()
    failures = []

    def render(idx):
        if pipe._compiled_unet is not None and len(failures) < fails:
            failures.append(idx)
            raise RuntimeError("BackendCompilerFailed: could not load a cached kernel")
        return [np.full((2, 2, 3), i, np.uint8) for i in idx]

    with pytest.warns(UserWarning, match="torch.compile failed"):
        images = run.render(render, [5, 6])
    assert [int(im[0, 0, 0]) for im in images] == [5, 6]
    assert failures[0] == [5, 6, 6, 6] and not (cache.inductor / "stale").exists()
    assert (run.failed, pipe._compiled_unet is None) == ((True, True) if fails == 2 else (False, False))
    assert run.note == ("eager (compile failed; see the warning)" if fails == 2 else "compiled (--compile on)")
    # errors after the first call are the job's, not the compiler's
    with pytest.raises(ValueError):
        run.render(lambda idx: (_ for _ in ()).throw(ValueError("bad")), [0])


def test_setup_wires_the_choice_into_the_rendering(tmp_path, monkeypatch):
    """setup(): on the CPU nothing changes (and a kept pipeline's compiled UNet is undone); on a GPU,
    "on" wraps the UNet with inductor's reduce-overhead mode, auto for a short clip stays eager."""
    from types import SimpleNamespace

    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "x"))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "Fake GPU")
    pipe = _FakePipe()
    pipe.image_size = 512
    pipe._compiled_unet = object()  # compiled by an earlier job of a kept pipeline
    call = dict(scheduler="dpm++", steps=25, guidance=3.0, ref_strength=0.8)

    def rendering(device):
        return SimpleNamespace(pipe=pipe, device=device, dtype=torch.float16, call=call, render_batches=None)

    r = rendering("cpu")
    assert not compiling.setup(r, "auto", frames=10_000, batch=32, cache=CompileCache(tmp_path / "c")).on
    assert r.compiled is None and r.compile_note == "" and pipe._compiled_unet is None
    r = rendering("cuda")
    compiling.setup(r, "on", frames=10, batch=32, log=lambda *_: None, cache=CompileCache(tmp_path / "c"))
    assert isinstance(r.compiled, CompiledBatches) and r.compiled.batch == 32 and pipe.compiles[-1] == "reduce-overhead"
    assert compiling.summary_note(r) == "compiled (--compile on)"
    r = rendering("cuda")
    choice = compiling.setup(r, "auto", frames=10, batch=32, cache=CompileCache(tmp_path / "c"))
    assert not choice.on and r.compiled is None and pipe._compiled_unet is None
    assert compiling.summary_note(r).startswith("eager (auto: compile would not pay for 10 frames")


def test_setup_compiles_the_decoder_alone_where_only_it_pays(tmp_path, monkeypatch):
    """auto, 5000 fast-mode frames, cold cache: the decoder compiles (in chunks of min(batch, 16) rows),
    the UNet does not, so batches are not padded; the note says both; a later job that wants neither
    undoes the kept pipeline's compiled decoder."""
    from types import SimpleNamespace

    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "x"))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "Fake GPU")
    pipe = _FakePipe()
    pipe.image_size = 512
    call = dict(scheduler="lcm", steps=4, guidance=1.0, ref_strength=0.8)
    r = SimpleNamespace(pipe=pipe, device="cuda", dtype=torch.float16, call=call, render_batches=None)
    choice = compiling.setup(r, "auto", frames=5000, batch=8, log=lambda *_: None, cache=CompileCache(tmp_path / "c"))
    assert not choice.on and r.compiled.decoder and not r.compiled.unet
    assert pipe.compiles == [] and pipe.decoder_compiles == [("default", 8)]
    assert r.compile_note.startswith("eager (auto: compile would not pay for 5000 frames")
    assert "; VAE decoder compiled (auto: ~34 s saved for ~25 s cold compile)" in r.compile_note
    seen = []
    images = r.compiled.render(lambda idx: seen.append(list(idx)) or [np.zeros((2, 2, 3), np.uint8)] * len(idx), [8, 9])
    assert seen == [[8, 9]] and len(images) == 2  # not padded to 8 rows
    assert CompileCache(tmp_path / "c").has(r.compiled.key) and r.compiled.key.startswith("decoder-c8-")
    compiling.setup(r, "off", frames=5000, batch=8, cache=CompileCache(tmp_path / "c"))
    assert r.compiled is None and pipe._compiled_decode is None and pipe.decoder_compiles[-1] == (None, 16)
