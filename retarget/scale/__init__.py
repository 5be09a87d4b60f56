"""Scale-out on Ray: one job's frames over many GPUs, many jobs from one file.

`options` (what a user sets: `--ray`, workers, how actor state travels), `actors`
(`FrameRenderer`, the Ray actor: loads the engine once, renders batches of frame indices),
`pool` (`RayPool`, the driver side: connects, starts actors, hands out batches as actors free
up, survives actor deaths; plugs into `retarget.run`'s stages through `prepare=`) and `jobs`
(`retarget batch`: a YAML file of run / storyboard / transition jobs).

May import `retarget.run`, `retarget.sheets`, `retarget.pipeline`, `retarget.weights`,
`retarget.cliargs`, `render` and `tracking`; `ray` only inside functions. Nothing in the core
(`run`, `pipeline`, `weights`) imports this package: the CLI is where they meet.
"""
