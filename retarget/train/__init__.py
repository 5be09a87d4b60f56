"""Training the adapters on your own footage: the dataset build, the dataset reader, the accelerate
loop and saving in the release formats (SPEC.md §1), so `retarget run --weights` loads the results
unchanged.

Modules: `dataset_build` (sources -> WebDataset shards + manifest), `data` (random access to the shards,
the seeded sample order), `formats` (trainable tensors <-> `exp_adapter.bin` / the diffusers LoRA file),
`loop` (the accelerate training loop, checkpoints, resume), `validation` (renders at checkpoints),
`commands` (the `dataset build` and `train` subcommands).

May import: the engine (`retarget.pipeline`, `components`, `identity`, `adapters`, `weights`), `tracking`
and `render`. Nothing in the core imports this package; the CLI is where they meet.
"""
