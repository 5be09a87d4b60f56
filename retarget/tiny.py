"""A complete *tiny* weight set: random, small configs, exactly the release formats and layout.

Tests and the offline demo run the real loading code on it. What changes behaviour is kept
real: the text encoder's hidden size (768, so the 512-d ArcFace vector is zero-padded into one
token), the UNet's cross-attention size (768), a VAE of four blocks (8x down-sampling, as SD),
the SMIRK encoder in its real timm architecture, the encoder saved as `pytorch_model.bin`.
The images these weights produce are meaningless noise-like pictures: they test plumbing,
shapes and numerics, not quality.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np

# The SD 1.5 scheduler config as released (a fact of the release, SPEC.md §2).
SD15_SCHEDULER_CONFIG = {
    "_class_name": "PNDMScheduler",
    "_diffusers_version": "0.6.0",
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "num_train_timesteps": 1000,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "trained_betas": None,
    "clip_sample": False,
}

TINY_WORDS = ("photo", "of", "a", "id", "person")
EXP_PROJECTIONS = ("linear", "faceid", "full")
N_EXP = 55


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible byte -> printable-unicode table (the BPE alphabet)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def write_tiny_tokenizer(folder: Path) -> int:
    """A working CLIP BPE tokenizer with the 512 byte symbols, merges that make each word of
    `photo of a id person` one token, and the two special tokens. Returns the vocab size."""
    folder.mkdir(parents=True, exist_ok=True)
    alphabet = list(_bytes_to_unicode().values())
    vocab_list = alphabet + [c + "</w>" for c in alphabet]
    merges = []
    for word in TINY_WORDS:
        parts = list(word[:-1]) + [word[-1] + "</w>"]
        while len(parts) > 1:
            merges.append(f"{parts[0]} {parts[1]}")
            parts = [parts[0] + parts[1]] + parts[2:]
            vocab_list.append(parts[0])
    vocab_list += ["<|startoftext|>", "<|endoftext|>"]
    vocab = {tok: i for i, tok in enumerate(dict.fromkeys(vocab_list))}
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    special = {"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>",
               "unk_token": "<|endoftext|>", "pad_token": "<|endoftext|>"}
    (folder / "special_tokens_map.json").write_text(json.dumps(special))
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {**special, "model_max_length": 77, "do_lower_case": True, "tokenizer_class": "CLIPTokenizer",
         "add_prefix_space": False, "errors": "replace"}))
    return len(vocab)


def tiny_unet_config() -> dict:
    """SD-1.5-shaped UNet, scaled down: attention at the first level and in the middle."""
    return dict(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1,
        block_out_channels=(32, 64), norm_num_groups=32, cross_attention_dim=768, attention_head_dim=8,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    )


def tiny_vae_config() -> dict:
    return dict(
        in_channels=3, out_channels=3, latent_channels=4, layers_per_block=1, norm_num_groups=8,
        block_out_channels=(8, 16, 16, 16), sample_size=64, scaling_factor=0.18215,
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
    )


def _cross_attention_layers(unet) -> list[tuple[str, int]]:
    """(processor name, hidden size) of each attn2, in the order diffusers numbers IP-Adapter keys."""
    out = []
    blocks = list(unet.config.block_out_channels)
    for name in unet.attn_processors.keys():
        if name.endswith("attn1.processor"):
            continue
        if name.startswith("mid_block"):
            hidden = blocks[-1]
        elif name.startswith("up_blocks"):
            hidden = list(reversed(blocks))[int(name[len("up_blocks.")])]
        else:
            hidden = blocks[int(name[len("down_blocks.")])]
        out.append((name, hidden))
    return out


def exp_adapter_state_dict(unet, projection: str = "linear", seed: int = 0) -> dict:
    """A random Expression Adapter in the IP-Adapter file format (SPEC.md §3).

    projection: "linear" (diffusers ImageProjection: 55 -> 4 tokens), "faceid" (MLP 55 -> 110 ->
    4 tokens, IPAdapterFaceIDImageProjection keys) or "full" (MLP 55 -> 55 -> 1 token + LayerNorm,
    IPAdapterFullImageProjection keys). diffusers infers which one from the keys.
    """
    import torch

    g = torch.Generator().manual_seed(seed)
    d = unet.config.cross_attention_dim

    def rnd(*shape, std=0.05):
        return torch.randn(*shape, generator=g) * std

    if projection == "linear":
        image_proj = {"proj.weight": rnd(4 * d, N_EXP, std=0.3), "proj.bias": rnd(4 * d),
                      "norm.weight": 1 + rnd(d), "norm.bias": rnd(d)}
    elif projection == "faceid":
        image_proj = {"proj.0.weight": rnd(2 * N_EXP, N_EXP, std=0.3), "proj.0.bias": rnd(2 * N_EXP),
                      "proj.2.weight": rnd(4 * d, 2 * N_EXP, std=0.3), "proj.2.bias": rnd(4 * d),
                      "norm.weight": 1 + rnd(d), "norm.bias": rnd(d)}
    elif projection == "full":
        image_proj = {"proj.0.weight": rnd(N_EXP, N_EXP, std=0.3), "proj.0.bias": rnd(N_EXP),
                      "proj.2.weight": rnd(d, N_EXP, std=0.3), "proj.2.bias": rnd(d),
                      "proj.3.weight": 1 + rnd(d), "proj.3.bias": rnd(d)}
    else:
        raise ValueError(f"projection must be one of {EXP_PROJECTIONS}, got {projection!r}")
    ip = {}
    for i, (_, hidden) in enumerate(_cross_attention_layers(unet)):
        key_id = 1 + 2 * i
        ip[f"{key_id}.to_k_ip.weight"] = rnd(hidden, d, std=0.2)
        ip[f"{key_id}.to_v_ip.weight"] = rnd(hidden, d, std=0.2)
    return {"image_proj": image_proj, "ip_adapter": ip}


def _lora_modules(unet) -> list[tuple[str, object]]:
    import torch

    names = ("to_q", "to_k", "to_v", "to_out.0")
    return [(n, m) for n, m in unet.named_modules()
            if isinstance(m, torch.nn.Linear) and ".attn" in n and n.endswith(names)]


def ref_lora_state_dict(unet, rank: int = 4, seed: int = 1) -> dict:
    """Random LoRA on every attention projection, in the diffusers file format
    (`unet.<module>.lora.down.weight` / `.lora.up.weight`), as diffusers' training scripts save it."""
    import torch

    g = torch.Generator().manual_seed(seed)
    sd = {}
    for name, lin in _lora_modules(unet):
        sd[f"unet.{name}.lora.down.weight"] = torch.randn(rank, lin.in_features, generator=g) * 0.1
        sd[f"unet.{name}.lora.up.weight"] = torch.randn(lin.out_features, rank, generator=g) * 0.1
    return sd


def lcm_lora_state_dict(unet, rank: int = 4, seed: int = 2) -> dict:
    """Random LoRA in the kohya-style key format that the SD 1.5 LCM-LoRA release uses
    (`lora_unet_<module with _>.lora_down.weight`, `.lora_up.weight`, `.alpha`)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    sd = {}
    for name, lin in _lora_modules(unet):
        key = "lora_unet_" + name.replace(".", "_")
        sd[f"{key}.lora_down.weight"] = torch.randn(rank, lin.in_features, generator=g) * 0.1
        sd[f"{key}.lora_up.weight"] = torch.randn(lin.out_features, rank, generator=g) * 0.1
        sd[f"{key}.alpha"] = torch.tensor(float(rank))
    return sd


def write_tiny_arcface_onnx(path: Path, seed: int = 3) -> None:
    """An ArcFace-shaped ONNX model: input `input.1` Nx3x112x112 -> 512-d, two strided convs and a Gemm."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    w1 = (rng.standard_normal((8, 3, 4, 4)) * 0.2).astype(np.float32)
    w2 = (rng.standard_normal((16, 8, 4, 4)) * 0.2).astype(np.float32)
    w3 = (rng.standard_normal((512, 16 * 7 * 7)) * 0.05).astype(np.float32)
    b3 = np.zeros(512, np.float32)
    inits = [numpy_helper.from_array(a, n) for a, n in ((w1, "w1"), (w2, "w2"), (w3, "w3"), (b3, "b3"))]
    nodes = [
        helper.make_node("Conv", ["input.1", "w1"], ["c1"], name="Conv_0", strides=[4, 4], kernel_shape=[4, 4]),
        helper.make_node("Relu", ["c1"], ["r1"], name="Relu_1"),
        helper.make_node("Conv", ["r1", "w2"], ["c2"], name="Conv_2", strides=[4, 4], kernel_shape=[4, 4]),
        helper.make_node("Relu", ["c2"], ["r2"], name="Relu_3"),
        helper.make_node("Flatten", ["r2"], ["f"], name="Flatten_4", axis=1),
        helper.make_node("Gemm", ["f", "w3", "b3"], ["embedding"], name="Gemm_5", transB=1),
    ]
    graph = helper.make_graph(
        nodes, "tiny_arcface",
        [helper.make_tensor_value_info("input.1", TensorProto.FLOAT, ["None", 3, 112, 112])],
        [helper.make_tensor_value_info("embedding", TensorProto.FLOAT, ["None", 512])],
        initializer=inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], producer_name="retarget-tiny")
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, str(path))


def smirk_state_dict(seed: int = 4) -> dict:
    """SMIRK checkpoint contents: the expression encoder (real timm architecture, random weights)
    under `smirk_encoder.expression_encoder.`, plus pose/shape-encoder keys a loader must ignore."""
    import timm
    import torch

    torch.manual_seed(seed)
    enc = timm.create_model("tf_mobilenetv3_large_minimal_100", pretrained=False, features_only=True)
    prefix = "smirk_encoder.expression_encoder."
    sd = {prefix + "encoder." + k: v.clone() for k, v in enc.state_dict().items()}
    sd[prefix + "expression_layers.0.weight"] = torch.randn(N_EXP, 960) * 0.05
    sd[prefix + "expression_layers.0.bias"] = torch.zeros(N_EXP)
    sd["smirk_encoder.pose_encoder.pose_cam_layers.1.weight"] = torch.randn(6, 576) * 0.01
    sd["smirk_encoder.shape_encoder.shape_layers.0.weight"] = torch.randn(300, 960) * 0.01
    sd["smirk_generator.encoder.0.weight"] = torch.randn(8, 3, 3, 3) * 0.01
    return sd


def write_tiny_weights(root: str | os.PathLike, *, exp_projection: str = "linear", seed: int = 0) -> Path:
    """Write the whole tiny set under `root` in the release layout (SPEC.md §1). Returns root.

    Written into a temporary folder beside `root` and moved into place file by file at the end,
    so an interrupted run leaves no half-written model behind.
    """
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from safetensors.torch import save_file
    from transformers import CLIPTextConfig, CLIPTextModel

    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tiny-", dir=root))
    try:
        torch.manual_seed(seed)
        vocab_size = write_tiny_tokenizer(tmp / "tokenizer")

        unet = UNet2DConditionModel(**tiny_unet_config())
        unet.save_pretrained(tmp / "arc2face")

        vae = AutoencoderKL(**tiny_vae_config())
        vae.save_pretrained(tmp / "vae")

        (tmp / "scheduler").mkdir()
        (tmp / "scheduler" / "scheduler_config.json").write_text(json.dumps(SD15_SCHEDULER_CONFIG, indent=2))

        text_cfg = CLIPTextConfig(
            vocab_size=vocab_size, hidden_size=768, intermediate_size=1024, num_hidden_layers=2,
            num_attention_heads=4, max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=768,
            bos_token_id=vocab_size - 2, eos_token_id=vocab_size - 1, pad_token_id=1,
        )
        encoder = CLIPTextModel(text_cfg).eval()
        (tmp / "encoder").mkdir()
        text_cfg.save_pretrained(tmp / "encoder")
        # The release ships pytorch_model.bin (a torch pickle), not safetensors.
        torch.save(encoder.state_dict(), tmp / "encoder" / "pytorch_model.bin")

        (tmp / "exp_adapter").mkdir()
        torch.save(exp_adapter_state_dict(unet, exp_projection, seed), tmp / "exp_adapter" / "exp_adapter.bin")

        (tmp / "ref_adapter").mkdir()
        save_file(ref_lora_state_dict(unet, seed=seed + 1), tmp / "ref_adapter" / "pytorch_lora_weights.safetensors")
        (tmp / "lcm_lora").mkdir()
        save_file(lcm_lora_state_dict(unet, seed=seed + 2), tmp / "lcm_lora" / "pytorch_lora_weights.safetensors")

        write_tiny_arcface_onnx(tmp / "arcface.onnx", seed=seed + 3)

        (tmp / "smirk").mkdir()
        torch.save(smirk_state_dict(seed + 4), tmp / "smirk" / "SMIRK_em1.pt")
        (tmp / "TINY_WEIGHTS.txt").write_text(
            "Random tiny weights written by `retarget weights tiny`. They load through the same code as the\n"
            "released files but produce meaningless pixels. Real weights: `retarget weights download`.\n")

        for item in sorted(tmp.iterdir()):
            dest = root / item.name
            if dest.is_dir():
                shutil.rmtree(dest)
            elif dest.exists():
                dest.unlink()
            os.replace(item, dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return root


def is_tiny(root: str | os.PathLike) -> bool:
    """True when `root` holds a tiny set written by `write_tiny_weights`."""
    return (Path(root) / "TINY_WEIGHTS.txt").is_file()
