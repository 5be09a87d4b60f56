"""The app's page: four tabs (Retarget, Expression studio, Storyboard, Transitions) and their
events. Layout and event wiring only: each handler checks the uploads, makes a job folder and
calls `retarget.app.jobs`, turning a RetargetError into the CLI's `error: ...` line on the page.
"""
# No `from __future__ import annotations` here: gradio finds the `request: gr.Request`
# parameters of the handlers by their (evaluated) annotations.

from typing import Any

from render.errors import RetargetError
from retarget.app import jobs
from retarget.app.config import AppOptions
from retarget.app.sessions import Sessions
from retarget.app.uploads import check_photo, check_video

GPU = "gpu"  # one concurrency group for every event that renders: one GPU job at a time
N_SLIDERS = 10  # expression coefficients with a slider in the studio


def _session(request) -> str | None:
    return getattr(request, "session_hash", None)


class App:
    """The state the handlers share: settings, the session folders, the GPU queue, presets."""

    def __init__(self, cfg: AppOptions, weights=None):
        from retarget.presets import PresetLibrary
        from retarget.run import keep_models_loaded
        from retarget.weights import WeightsLayout

        cfg.validate()
        self.cfg = cfg
        self.layout = weights if isinstance(weights, WeightsLayout) else WeightsLayout(weights)
        self.sessions = Sessions(cfg.sessions_dir)
        self.queue = jobs.GpuQueue()
        self.presets = PresetLibrary()
        keep_models_loaded(True)

    def settings(self, mode: str, ref_strength: float = 0.8, seed: float = 0) -> jobs.RenderSettings:
        return jobs.RenderSettings(fast=(mode == "fast"), ref_strength=float(ref_strength), seed=int(seed or 0),
                                   device=self.cfg.device)

    def stream(self, fn, *args, **kwargs):
        """Run `fn` on the GPU queue: yield status lines, then return its result (generator)."""
        stream = self.queue.stream(fn, *args, weights=self.layout, **kwargs)
        try:
            for state, value in stream:
                if state == "running":
                    yield value
                else:
                    return value
        finally:
            stream.close()


def _fail(e: RetargetError):
    import gradio as gr

    return gr.Error(f"error: {e}", print_exception=False)


def build_app(cfg: AppOptions | None = None, weights=None):
    """The gradio Blocks of the app (not launched). `weights`: a folder or WeightsLayout."""
    import gradio as gr

    app = App(cfg or AppOptions(), weights)
    cfg = app.cfg
    presets = app.presets.names()

    with gr.Blocks(title="retarget", analytics_enabled=False) as demo:
        gr.Markdown("# retarget\nRe-render an actor's face performing someone else's facial performance.")

        # ----------------------------------------------------------------- Retarget
        with gr.Tab("Retarget", id="retarget"):
            with gr.Row():
                drive = gr.Video(label="driving video", sources=["upload"], elem_id="rt-drive")
                actor = gr.Image(label="actor photo", type="filepath", sources=["upload"], elem_id="rt-actor")
            with gr.Row():
                mode = gr.Radio(["quality", "fast"], value="quality", label="mode",
                                info="quality: DPM++ 25 steps; fast: LCM-LoRA 4 steps")
                relative = gr.Checkbox(label="relative (transfer the change from the driver's neutral)")
                ref = gr.Slider(0, 1.5, value=0.8, step=0.05, label="reference strength")
            with gr.Row():
                g_jaw = gr.Slider(0, 2, value=1.0, step=0.05, label="jaw gain")
                g_eye = gr.Slider(0, 2, value=1.0, step=0.05, label="eyelids gain")
                g_exp = gr.Slider(0, 2, value=1.0, step=0.05, label="expression gain")
            with gr.Row():
                start = gr.Number(value=0, label="start (s)", minimum=0)
                end = gr.Number(value=0, label="end (s, 0: to the end)", minimum=0)
                seed = gr.Number(value=0, label="seed", precision=0)
            with gr.Row():
                go = gr.Button("Render", variant="primary", elem_id="rt-go")
                stop = gr.Button("Cancel", elem_id="rt-cancel")
            status = gr.Markdown(elem_id="rt-status")
            with gr.Row():
                out_video = gr.Video(label="output", interactive=False, elem_id="rt-out")
                out_preview = gr.Video(label="side by side", interactive=False, elem_id="rt-preview")
            out_files = gr.File(label="downloads", file_count="multiple", interactive=False)

            def on_retarget(drive_p, actor_p, mode_v, rel, gj, ge, gx, ref_v, s, e, seed_v, request: gr.Request):
                try:
                    d = check_video(drive_p, cfg)
                    a = check_photo(actor_p, cfg)
                    out_dir = app.sessions.job_dir(_session(request), "retarget")
                    work = yield from _pass_status(app.stream(
                        jobs.retarget_video, d, a, out_dir, app.settings(mode_v, ref_v, seed_v), relative=rel,
                        gain=jobs.gain_spec(gj, ge, gx), start=s, end=e), 4)
                except RetargetError as err:
                    raise _fail(err) from None
                files = [p for p in (work["video"], work["preview"]) if p]
                yield work["summary"], work["video"], work["preview"], files

            ev = go.click(on_retarget, [drive, actor, mode, relative, g_jaw, g_eye, g_exp, ref, start, end, seed],
                          [status, out_video, out_preview, out_files], concurrency_limit=1, concurrency_id=GPU,
                          api_name="retarget")
            stop.click(None, None, None, cancels=[ev])

        # ----------------------------------------------------------------- Expression studio
        with gr.Tab("Expression studio", id="studio"):
            with gr.Row():
                s_actor = gr.Image(label="actor photo", type="filepath", sources=["upload"])
                with gr.Column():
                    s_kind = gr.Radio(["preset", "photo", "clip"], value="preset", label="expression from")
                    s_preset = gr.Dropdown(presets, value=presets[0] if presets else None, label="preset",
                                           allow_custom_value=False)
                    s_photo = gr.Image(label="expression photo", type="filepath", sources=["upload"])
                    s_clip = gr.Video(label="expression clip", sources=["upload"])
                    s_time = gr.Number(value=0, label="clip time (s)", minimum=0)
                    s_read = gr.Button("Read expression")
            s_state = gr.State(None)
            with gr.Row():
                s_jaw = gr.Slider(0, 0.6, value=0, step=0.01, label="jaw opening (rad)")
                s_eye_l = gr.Slider(0, 1, value=0, step=0.01, label="left eyelid closure")
                s_eye_r = gr.Slider(0, 1, value=0, step=0.01, label="right eyelid closure")
            coeffs = [gr.Slider(-3, 3, value=0, step=0.05, label=f"expression {i}") for i in range(N_SLIDERS)]
            with gr.Row():
                s_mode = gr.Radio(["fast", "quality"], value="fast", label="mode")
                s_go = gr.Button("Render", variant="primary")
            s_status = gr.Markdown()
            s_out = gr.Image(label="result", interactive=False, type="filepath")
            with gr.Row():
                s_name = gr.Textbox(label="preset name", max_lines=1)
                s_note = gr.Textbox(label="note", max_lines=1)
                s_save = gr.Button("Save as preset")

            def on_read(kind, preset, photo, clip, t):
                try:
                    params = yield from _pass_status(app.stream(
                        jobs.read_expression, _studio_spec(kind, preset, photo, clip, t, cfg)), 5 + N_SLIDERS)
                except RetargetError as err:
                    raise _fail(err) from None
                yield (f"expression read from {kind}", params, *jobs.slider_values(params, N_SLIDERS))

            s_read.click(on_read, [s_kind, s_preset, s_photo, s_clip, s_time],
                         [s_status, s_state, s_jaw, s_eye_l, s_eye_r, *coeffs], concurrency_limit=1,
                         concurrency_id=GPU, api_name="read_expression")

            def on_studio(request: gr.Request, actor_p, mode_v, params, jaw, el, er, *cs):
                try:
                    a = check_photo(actor_p, cfg)
                    vec = jobs.with_sliders(params, jaw, el, er, cs)
                    out_dir = app.sessions.job_dir(_session(request), "studio")
                    png = yield from _pass_status(app.stream(jobs.render_still, a, vec, out_dir / "still.png",
                                                             app.settings(mode_v)), 2)
                except RetargetError as err:
                    raise _fail(err) from None
                yield "rendered", png

            s_go.click(on_studio, [s_actor, s_mode, s_state, s_jaw, s_eye_l, s_eye_r, *coeffs], [s_status, s_out],
                       concurrency_limit=1, concurrency_id=GPU, api_name="studio")

            def on_save(name, note, params, jaw, el, er, *cs):
                try:
                    vec = jobs.with_sliders(params, jaw, el, er, cs)
                    preset, replaced = app.presets.add(str(name or "").strip(), vec, note=note or "",
                                                       source="retarget app (expression studio)")
                except RetargetError as err:
                    raise _fail(err) from None
                verb = "replaced" if replaced else "saved"
                return f"{verb} preset {preset.name!r}", gr.update(choices=app.presets.names())

            s_save.click(on_save, [s_name, s_note, s_state, s_jaw, s_eye_l, s_eye_r, *coeffs], [s_status, s_preset],
                         api_name="save_preset")

        # ----------------------------------------------------------------- Storyboard
        with gr.Tab("Storyboard", id="storyboard"):
            b_actor = gr.Image(label="actor photo", type="filepath", sources=["upload"])
            b_pics = gr.File(label="pictures named in the table (photos, clips)", file_count="multiple",
                             type="filepath")
            b_table = gr.Dataframe(headers=["source", "caption"], datatype=["str", "str"], row_count=3,
                                   column_count=(2, "fixed"), value=[["neutral", "neutral"], ["jaw_open", "open"],
                                                                     ["eyes_closed", "eyes shut"]],
                                   label="panels: source = preset, numbers, or NAME / NAME@SEC / NAME#FRAME of an upload")
            with gr.Row():
                b_mode = gr.Radio(["fast", "quality"], value="fast", label="mode")
                b_cols = gr.Slider(1, 8, value=3, step=1, label="columns")
                b_go = gr.Button("Render sheet", variant="primary")
            b_status = gr.Markdown()
            b_sheet = gr.Image(label="sheet", interactive=False, type="filepath")
            b_files = gr.File(label="downloads (panels, sheet, resolved script)", file_count="multiple",
                              interactive=False)

            def on_board(actor_p, pics, table, mode_v, cols, request: gr.Request):
                try:
                    a = check_photo(actor_p, cfg)
                    panels = jobs.table_rows(table, 2, cfg.max_panels, "panel")
                    out_dir = app.sessions.job_dir(_session(request), "storyboard")
                    res = yield from _pass_status(app.stream(jobs.storyboard_job, a, panels, _uploads(pics, cfg),
                                                             out_dir, app.settings(mode_v), columns=int(cols)), 3)
                except RetargetError as err:
                    raise _fail(err) from None
                yield res["summary"], res["sheet"], res["files"]

            b_go.click(on_board, [b_actor, b_pics, b_table, b_mode, b_cols], [b_status, b_sheet, b_files],
                       concurrency_limit=1, concurrency_id=GPU, api_name="storyboard")

        # ----------------------------------------------------------------- Transitions
        with gr.Tab("Transitions", id="transitions"):
            t_actor = gr.Image(label="actor photo", type="filepath", sources=["upload"])
            t_pics = gr.File(label="pictures named in the table (photos, clips)", file_count="multiple",
                             type="filepath")
            t_table = gr.Dataframe(headers=["source", "time (s)", "hold (s)"], datatype=["str", "number", "number"],
                                   row_count=2, column_count=(3, "fixed"),
                                   value=[["neutral", 0, 0], ["jaw_open", 1.0, 0.5]],
                                   label="keyframes: source = preset, numbers, or NAME / NAME@SEC / NAME#FRAME of an upload")
            with gr.Row():
                from tracking.keyframes import EASINGS

                t_ease = gr.Dropdown(list(EASINGS), value="smoothstep", label="easing")
                t_fps = gr.Number(value=25, label="fps", minimum=1, maximum=120)
                t_mode = gr.Radio(["fast", "quality"], value="fast", label="mode")
                t_go = gr.Button("Render video", variant="primary")
            t_status = gr.Markdown()
            t_video = gr.Video(label="transition", interactive=False)
            t_files = gr.File(label="downloads (video, track file)", file_count="multiple", interactive=False)

            def on_transition(actor_p, pics, table, ease, fps, mode_v, request: gr.Request):
                try:
                    a = check_photo(actor_p, cfg)
                    keys = jobs.table_rows(table, 3, cfg.max_panels, "keyframe")
                    out_dir = app.sessions.job_dir(_session(request), "transition")
                    res = yield from _pass_status(app.stream(jobs.transition_job, a, keys, _uploads(pics, cfg),
                                                             out_dir, app.settings(mode_v), easing=ease,
                                                             fps=float(fps or 25)), 3)
                except RetargetError as err:
                    raise _fail(err) from None
                yield res["summary"], res["video"], res["files"]

            t_go.click(on_transition, [t_actor, t_pics, t_table, t_ease, t_fps, t_mode], [t_status, t_video, t_files],
                       concurrency_limit=1, concurrency_id=GPU, api_name="transition")

        def on_leave(request: gr.Request):
            app.sessions.end(_session(request))

        demo.unload(on_leave)

    demo.queue(max_size=cfg.queue_size, default_concurrency_limit=1)
    demo.retarget_app = app
    return demo


def _pass_status(gen, n_outputs: int):
    """Re-yield a job's status lines as page updates (the status text; other outputs unchanged)
    and return the job's result: `result = yield from _pass_status(app.stream(...), n)`."""
    import gradio as gr

    try:
        while True:
            try:
                line = next(gen)
            except StopIteration as stop:
                return stop.value
            yield (line,) + tuple(gr.update() for _ in range(n_outputs - 1))
    finally:
        gen.close()  # a cancelled event closes us: close the job's stream, which cancels the job


def _uploads(files, cfg: AppOptions) -> dict:
    """The uploaded pictures by name, each checked (photo or clip)."""
    from retarget.app.config import PHOTO_TYPES
    from retarget.app.sources_in_app import uploads_by_name

    named = uploads_by_name(files)
    for name, path in named.items():
        (check_photo if path.suffix.lower() in PHOTO_TYPES else check_video)(path, cfg, f"picture {name}")
    return named


def _studio_spec(kind: str, preset, photo, clip, t, cfg: AppOptions) -> Any:
    """The expression source the studio's widgets describe (checked uploads only)."""
    if kind == "preset":
        if not preset:
            raise RetargetError("expression studio: choose a preset")
        return preset
    if kind == "photo":
        return str(check_photo(photo, cfg, "expression photo"))
    return f"{check_video(clip, cfg, 'expression clip')}@{float(t or 0):g}"


def launch(cfg: AppOptions, weights=None) -> None:
    """Build and serve the app until interrupted; per-session folders are removed at the end."""
    demo = build_app(cfg, weights)
    try:
        demo.launch(server_name=cfg.host, server_port=cfg.port, ssr_mode=False, show_error=True, quiet=False)
    finally:
        demo.retarget_app.sessions.close()
