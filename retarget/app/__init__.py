"""The web app (`retarget app`): a Gradio layout and its event handlers over the same Python API
the CLI calls (retarget.run, retarget.sheets, the expression sources and the preset library).

What it may import: gradio, the jobs (retarget.run, retarget.sheets, retarget.sources,
retarget.presets), tracking and render. Nothing in the core imports this package; gradio is
imported only when the app is built, never when `retarget` is imported.

Modules: `config` (limits and folders), `uploads` (checks on every uploaded file), `sessions`
(per-session output folders, removed when the browser leaves), `jobs` (the calls into the API,
one GPU job at a time, progress and cancel), `layout` (the four tabs and their events).
"""
