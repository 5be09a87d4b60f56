"""`retarget train` options as a dataclass (the CLI is generated from it); kept apart from the loop so that
building the command line imports no torch."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class TrainOptions:
    """`retarget train` options (the CLI is generated from these fields)."""

    steps: int = field(default=2000, metadata={"help": "optimizer steps in all"})
    batch_size: int = field(default=8, metadata={"help": "samples per process per micro-batch"})
    grad_accum: int = field(default=1, metadata={"help": "micro-batches per optimizer step (gradient accumulation)"})
    lr: float = field(default=1e-4, metadata={"help": "AdamW learning rate"})
    lr_warmup: int = field(default=0, metadata={"help": "steps of linear learning-rate warm-up"})
    weight_decay: float = field(default=1e-2, metadata={"help": "AdamW weight decay"})
    max_grad_norm: float = field(default=1.0, metadata={"help": "clip the gradient norm to this (0: off)"})
    mixed_precision: str = field(default="auto", metadata={
        "choices": ("auto", "no", "fp16", "bf16"),
        "help": "accelerate mixed precision; auto: fp16 on CUDA, none on the CPU"})
    gradient_checkpointing: bool = field(default=False, metadata={
        "help": "recompute UNet activations in the backward pass (less memory, slower)"})
    adam8bit: bool = field(default=False, metadata={"help": "8-bit AdamW from bitsandbytes (CUDA; must be installed)"})
    seed: int = field(default=0, metadata={"help": "seed of the data order and of every random draw"})
    init: str = field(default="release", metadata={
        "choices": ("release", "scratch"),
        "help": "start from the released adapter (fine-tune) or from a fresh one"})
    rank: int = field(default=16, metadata={"help": "LoRA rank of a fresh Reference Adapter (--init scratch)"})
    lora_targets: str = field(default="attn1", metadata={
        "choices": ("attn1", "all"), "help": "layers of a fresh Reference Adapter LoRA: self-attention or all"})
    drop_identity: float = field(default=0.05, metadata={"help": "probability of the empty prompt (CFG)"})
    drop_expression: float = field(default=0.1, metadata={"help": "probability of a zero expression (CFG)"})
    drop_reference: float = field(default=0.1, metadata={"help": "reference mode: probability of no bank read (CFG)"})
    checkpoint_every: int = field(default=500, metadata={"help": "save a checkpoint (and validate) every N steps"})
    keep_checkpoints: int = field(default=3, metadata={"help": "checkpoints kept (older ones deleted; 0: keep all)"})
    validate: bool = field(default=True, metadata={"negative": "--no-validate", "help": "validation renders at checkpoints",
                                                   "negative_help": "no validation renders"})
    val_count: int = field(default=4, metadata={"help": "validation (identity, expression) pairs"})
    val_steps: int = field(default=25, metadata={"help": "denoising steps of the validation renders"})
    resume: bool = field(default=False, metadata={"help": "continue the run in -o from its latest checkpoint"})
    device: str = field(default="auto", metadata={"choices": ("auto", "cuda", "cpu")})
