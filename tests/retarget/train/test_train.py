"""Training on tiny weights and the sample-clip dataset: the loss goes down, the saved adapters are the
release formats and change what `retarget run --weights` renders, resume is exact, accumulation and
checkpointing compute the same, and bad options fail before any work."""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest
import torch

from render.errors import RetargetError
from retarget.train.options import TrainOptions

FAST = dict(batch_size=2, lr=1e-3, val_steps=2, val_count=2)


def _opts(**kw) -> TrainOptions:
    return TrainOptions(**{**FAST, **kw})


def _held_out_loss(mode, data_dir, weights, adapter_root=None) -> float:
    """Loss on a fixed batch (positions no run reaches, so fixed draws) of the released or a trained adapter."""
    from retarget.train.data import TrainData
    from retarget.train.model import Objective, build_training_pipeline, collate
    from retarget.weights import WeightsLayout

    model = build_training_pipeline(WeightsLayout(adapter_root or weights), mode)
    data = TrainData(data_dir)
    n = len(data) if mode == "expression" else len(data.pairs)
    idx = list(range(min(n, 8)))
    pos = [10**9 + i for i in idx]
    return Objective(model, seed=0).evaluate(collate(data, mode, idx, pos))


def _render(weights, actor_crop, arcface, exp, ref_strength):
    from retarget.pipeline import RetargetPipeline
    from retarget.weights import WeightsLayout

    pipe = RetargetPipeline.from_weights(WeightsLayout(weights), device="cpu", dtype=torch.float32)
    actor = pipe.make_actor(arcface, actor_crop if ref_strength > 0 else None, seed=0)
    return pipe(actor, exp[None], seed=0, steps=2, ref_strength=ref_strength)[0]


@pytest.fixture(scope="module")
def expression_run(built, tiny_weights, tmp_path_factory):
    from retarget.train.loop import train

    losses = []
    run = tmp_path_factory.mktemp("exp") / "run"
    result = train("expression", built[0], run, _opts(steps=30, checkpoint_every=15), weights=tiny_weights,
                   progress=False, on_step=lambda s, loss: losses.append((s, loss)))
    return result, losses


def test_expression_training_lowers_the_loss_and_saves_the_release_format(expression_run, built, tiny_weights):
    from retarget.train.data import TrainData

    result, seen = expression_run
    run = result.run
    assert [s for s, _ in seen] == list(range(1, 31)) and result.losses == [loss for _, loss in seen]
    before = _held_out_loss("expression", built[0], tiny_weights)
    after = _held_out_loss("expression", built[0], tiny_weights, adapter_root=result.weights)
    assert after < 0.95 * before, (before, after)
    # The release format: the same keys and shapes as the released file, loaded with weights_only.
    released = torch.load(tiny_weights / "exp_adapter" / "exp_adapter.bin", weights_only=True)
    trained = torch.load(result.adapter, weights_only=True)
    assert set(trained) == {"image_proj", "ip_adapter"}
    for part in trained:
        assert {k: tuple(v.shape) for k, v in trained[part].items()} == \
               {k: tuple(v.shape) for k, v in released[part].items()}
    assert not torch.equal(trained["image_proj"]["proj.weight"], released["image_proj"]["proj.weight"])
    # Through the normal weights path: `retarget run --weights RUN/weights` renders other frames.
    item = TrainData(built[0])[3]
    base = _render(tiny_weights, item["image"], item["arcface"], item["exp"], 0.0)
    new = _render(result.weights, item["image"], item["arcface"], item["exp"], 0.0)
    assert np.abs(base.astype(int) - new.astype(int)).mean() > 1.0
    # The run folder: log, curve, checkpoints with validation sheets, final adapter.
    log = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == list(range(1, 31)) and [r["loss"] for r in log] == result.losses
    assert (run / "loss.png").stat().st_size > 1000
    assert sorted(p.name for p in (run / "val").iterdir()) == ["step-000015.png", "step-000030.png"]
    assert (run / "checkpoints" / "step-000015" / "exp_adapter" / "exp_adapter.bin").is_file()
    assert (result.weights / "arc2face").resolve() == (tiny_weights / "arc2face").resolve()


def test_interrupted_at_15_and_resumed_gives_the_same_losses(expression_run, built, tiny_weights, tmp_path):
    from retarget.train.loop import train

    full, _ = expression_run
    run = tmp_path / "run"

    def stop(step, loss):
        if step == 15:
            raise KeyboardInterrupt

    opts = _opts(steps=30, checkpoint_every=100, validate=False)
    with pytest.raises(KeyboardInterrupt):
        train("expression", built[0], run, opts, weights=tiny_weights, progress=False, on_step=stop)
    assert (run / "checkpoints" / "step-000015" / "state.json").is_file()
    with pytest.raises(RetargetError, match="--resume"):
        train("expression", built[0], run, opts, weights=tiny_weights, progress=False)
    with pytest.raises(RetargetError, match="other settings.*lr"):
        train("expression", built[0], run, _opts(steps=30, lr=5e-4, resume=True), weights=tiny_weights,
              progress=False)
    resumed = train("expression", built[0], run, _opts(steps=30, checkpoint_every=100, validate=False, resume=True),
                    weights=tiny_weights, progress=False)
    with pytest.raises(RetargetError, match="already at step 30"):
        train("expression", built[0], run, _opts(steps=30, checkpoint_every=100, validate=False, resume=True),
              weights=tiny_weights, progress=False)
    # Exact by design: same machine, same batch shapes, every draw seeded by the sample position, the
    # optimizer state and the trainable tensors saved bit for bit.
    assert resumed.losses == full.losses
    a = torch.load(resumed.adapter, weights_only=True)
    b = torch.load(full.adapter, weights_only=True)
    for part in a:
        for k in a[part]:
            assert torch.equal(a[part][k], b[part][k]), k


def test_reference_training_through_the_cli(built, tiny_weights, tmp_path, capsys, make_stock, stock_unet):
    from retarget.cli import main
    from retarget.train.data import TrainData

    run = tmp_path / "ref"
    code = main(["train", "reference", str(built[0]), "--weights", str(tiny_weights), "-o", str(run),
                 "--steps", "30", "--batch-size", "2", "--lr", "3e-3", "--checkpoint-every", "30", "--no-validate"])
    assert code == 0 and "trained 30 steps" in capsys.readouterr().out
    before = _held_out_loss("reference", built[0], tiny_weights)
    after = _held_out_loss("reference", built[0], tiny_weights, adapter_root=run / "weights")
    assert after < 0.95 * before, (before, after)
    from safetensors.torch import load_file

    released = load_file(tiny_weights / "ref_adapter" / "pytorch_lora_weights.safetensors")
    trained = load_file(run / "final" / "ref_adapter" / "pytorch_lora_weights.safetensors")
    assert {k: v.shape for k, v in trained.items()} == {k: v.shape for k, v in released.items()}
    assert all(k.startswith("unet.") and (k.endswith(".lora.down.weight") or k.endswith(".lora.up.weight"))
               for k in trained)
    # A stock diffusers pipeline loads the file as the release's code does, with the trained values.
    import copy

    from retarget.adapters.fusion import delta_weight
    from retarget.train import formats

    sd = make_stock(copy.deepcopy(stock_unet))
    sd.load_lora_weights(str(run / "final" / "ref_adapter"), weight_name="pytorch_lora_weights.safetensors",
                         adapter_name="ref")
    name, layer = formats.lora_layers(sd.unet, "ref")[0]
    down, up = trained[f"unet.{name}.lora.down.weight"], trained[f"unet.{name}.lora.up.weight"]
    torch.testing.assert_close(delta_weight(layer, "ref"), up @ down, rtol=1e-6, atol=1e-8)
    data = TrainData(built[0])
    ref, tgt = (int(i) for i in data.pairs[0])
    base = _render(tiny_weights, data[ref]["image"], data[ref]["arcface"], data[tgt]["exp"], 0.8)
    new = _render(run / "weights", data[ref]["image"], data[ref]["arcface"], data[tgt]["exp"], 0.8)
    assert np.abs(base.astype(int) - new.astype(int)).mean() > 1.0


def _first_losses(mode, built, tiny_weights, tmp_path, name, **kw):
    from retarget.train.loop import train

    return train(mode, built[0], tmp_path / name, _opts(steps=3, validate=False, **kw), weights=tiny_weights,
                 progress=False).losses


def test_accumulation_and_checkpointing_compute_the_same(built, tiny_weights, tmp_path):
    # Batch 2 = two accumulated micro-batches of 1 (same samples, same draws): equal up to fp32 summation
    # order and batch shape (~1e-6 relative on CPU, GUIDE); gradient checkpointing recomputes the same ops.
    base = _first_losses("reference", built, tiny_weights, tmp_path, "a")
    accum = _first_losses("reference", built, tiny_weights, tmp_path, "b", batch_size=1, grad_accum=2)
    ckpt = _first_losses("reference", built, tiny_weights, tmp_path, "c", gradient_checkpointing=True)
    np.testing.assert_allclose(accum, base, rtol=1e-5)
    np.testing.assert_allclose(ckpt, base, rtol=1e-5)
    assert len(set(base)) == 3


def test_fresh_adapters_start_from_the_plain_unet(tiny_weights):
    from retarget.train import formats
    from retarget.train.model import build_training_pipeline
    from retarget.weights import WeightsLayout

    layout = WeightsLayout(tiny_weights)
    ref = build_training_pipeline(layout, "reference", init="scratch", rank=2)
    state = formats.lora_state(ref.pipe.unet)
    ups = [v for k, v in state.items() if k.endswith("lora.up.weight")]
    assert ups and all(float(v.abs().max()) == 0 for v in ups)  # LoRA starts as a no-op
    assert all(".attn1." in k for k in state)
    exp = build_training_pipeline(layout, "expression", init="scratch")
    ip = exp.adapter_state()["ip_adapter"]
    attn2 = exp.pipe.unet.get_submodule("down_blocks.0.attentions.0.transformer_blocks.0.attn2")
    assert torch.equal(ip["1.to_k_ip.weight"], attn2.to_k.weight)


def test_bad_options_fail_before_any_work(built, tiny_weights, tmp_path, monkeypatch):
    from retarget.train.loop import train

    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # as when it is not installed
    with pytest.raises(RetargetError, match="--adam8bit needs bitsandbytes"):
        train("expression", built[0], tmp_path / "r", _opts(adam8bit=True), weights=tiny_weights)
    with pytest.raises(RetargetError, match="--steps"):
        train("expression", built[0], tmp_path / "r", _opts(steps=0), weights=tiny_weights)
    with pytest.raises(RetargetError, match="not a dataset folder"):
        train("expression", tmp_path, tmp_path / "r", _opts(), weights=tiny_weights)
    with pytest.raises(RetargetError, match="fp16 needs a CUDA GPU"):
        train("expression", built[0], tmp_path / "r", _opts(mixed_precision="fp16", device="cpu"), weights=tiny_weights)
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("argv", [["dataset", "--help"], ["dataset", "build", "--help"], ["train", "--help"]])
def test_help_has_examples(argv, capsys):
    from retarget.cli import main

    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 0 and "examples:" in capsys.readouterr().out


def test_cli_error_is_one_line(tmp_path, capsys):
    from retarget.cli import main

    assert main(["train", "expression", str(tmp_path / "nothing"), "-o", str(tmp_path / "run")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "not a dataset folder" in err[0]


def test_stock_diffusers_loads_the_trained_files_from_disk(expression_run, make_stock, stock_unet):
    """The release's own code path: `load_ip_adapter(folder, weight_name=...)` of a stock diffusers pipeline
    reads the trained file as written (the LoRA: test_reference_training_through_the_cli)."""
    import copy

    from retarget.train import formats

    result, _ = expression_run
    sd = make_stock(copy.deepcopy(stock_unet))
    folder = result.weights / "exp_adapter"
    sd.load_ip_adapter(str(folder), subfolder="", weight_name="exp_adapter.bin", image_encoder_folder=None)
    trained = torch.load(result.adapter, weights_only=True)
    procs = formats.ip_processors(sd.unet)
    assert procs and torch.equal(procs[0][1].to_k_ip[0].weight, trained["ip_adapter"]["1.to_k_ip.weight"])
