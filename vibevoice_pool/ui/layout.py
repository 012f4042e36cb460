"""The page's layout: components, examples, styles, and which handler each event calls.

The handlers live in ui.Page; this module only arranges them. Status refreshes
(the panel every second, the charts every few seconds, the voice list on load)
are queue=False, concurrency_limit=None, hidden progress and private, so they
keep working while the queue is full and never appear in the public API.
Generate is the one public endpoint (`/generate`, for gradio_client).
"""

from __future__ import annotations

import gradio as gr

from vibevoice_pool.script import MAX_SPEAKERS
from vibevoice_pool.ui.charts import CHARTS_CSS
from vibevoice_pool.ui.i18n import gradio_i18n, t
from vibevoice_pool.ui.jobs import JOBS_CSS
from vibevoice_pool.ui.panel import PANEL_CSS
from workers.wire import messages as m

PANEL_EVERY_S = 1.0
CHARTS_EVERY_S = 3.0
# Status refreshes: past the queue, no spinner, not in the public API.
QUIET = dict(queue=False, concurrency_limit=None, show_progress="hidden", api_visibility="private")

# (label, script, speakers); a label, since Gradio cannot translate an examples table's header
EXAMPLES = [
    [
        "🎙️ Podcast · 播客 (2)",
        "Speaker 1: Welcome back to the show. Today we talk about serving speech models.\n"
        "Speaker 2: Thanks for having me. It is a topic close to my heart.\n"
        "Speaker 1: Let us start with the basics: why run one worker per GPU?\n"
        "Speaker 2: Because each GPU can then fail, restart and be scheduled on its own.",
        2,
    ],
    [
        "📢 Announcement · 公告 (1)",
        "Speaker 1: Hello! This is a single speaker reading a short announcement.",
        1,
    ],
    [
        "🇨🇳 中文对话 · Chinese dialogue (2)",
        "Speaker 1: 大家好，欢迎收听本期节目。\nSpeaker 2: 谢谢邀请，很高兴来到这里。\n"
        "Speaker 1: 今天我们聊聊语音合成。",
        2,
    ],
    [
        "👥 Meeting · 会议 (4)",
        "Speaker 1: Shall we begin?\nSpeaker 2: Ready when you are.\n"
        "Speaker 3: I will take notes.\nSpeaker 4: And I will keep time.",
        4,
    ],
]

# Gradio titles its toasts from their kind, in English, whatever their `title`: on a
# Chinese browser (PAGE_HEAD marks <html lang> from the browser) the title is ours.
TOAST_CSS = "".join(
    f"html:lang(zh) .toast-title.{kind} {{ font-size: 0; }}\n"
    f'html:lang(zh) .toast-title.{kind}::after {{ content: "{t("zh", "toast." + kind)}"; '
    "font-size: var(--text-md); }\n"
    for kind in ("info", "warning", "error")
)
PAGE_HEAD = "<script>document.documentElement.lang = navigator.language || 'en';</script>"

PAGE_CSS = (
    PANEL_CSS
    + TOAST_CSS
    + CHARTS_CSS
    + JOBS_CSS
    + """
.vv-progress { font-size: 0.95em; }
.vv-progress-bar { height: 6px; border-radius: 3px; background: var(--border-color-primary);
                   margin-top: 4px; overflow: hidden; }
.vv-progress-bar > div { height: 100%; background: var(--color-accent); }
.vv-live audio { width: 100%; }
"""
)


PAGE_SESSIONS = 500  # page sessions (tabs) whose state is kept: about 60 MiB at most


def build(page) -> gr.Blocks:
    """The page's components and events, wired to the handlers of a ui.Page."""
    i18n = gradio_i18n()
    # Every complete audio is a file in Gradio's cache: drop those over an hour old.
    with gr.Blocks(title="VibeVoice pool", delete_cache=(1800, 3600)) as demo:
        # Gradio keeps each page session's state (about 125 KiB) until 10,000 sessions;
        # past PAGE_SESSIONS the least recently used one goes (read at the mount).
        demo.state_session_capacity = PAGE_SESSIONS
        gr.Markdown(i18n("title"))
        with gr.Row():
            with gr.Column(scale=2, min_width=440):
                panel = gr.HTML("", elem_id="vv-panel")  # filled on load, in the tab's language
            with gr.Column(scale=3), gr.Tabs():
                with gr.Tab(i18n("tab_generate"), elem_id="vv-tab-generate"):
                    voices, voice_events = _generate_tab(page, i18n)
                jobs = getattr(page.front, "jobs", None)
                job_voices = None
                if jobs is not None:  # durable jobs (jobs/runner.py), when the server runs them
                    from vibevoice_pool.ui.jobs import add_jobs_tab

                    job_voices = add_jobs_tab(page.front, jobs, i18n)
        with gr.Accordion(i18n("charts"), open=True):
            charts = gr.HTML("", elem_id="vv-charts")
        gr.Timer(PANEL_EVERY_S).tick(page.panel, None, panel, **QUIET)
        gr.Timer(CHARTS_EVERY_S).tick(page.charts, None, charts, **QUIET)
        demo.load(page.panel, None, panel, **QUIET)
        demo.load(page.charts, None, charts, **QUIET)
        demo.load(page.refresh_voices, voices, voices, **QUIET)
        if job_voices is not None:  # the Jobs tab's list follows uploads as the dropdowns do
            demo.load(page.job_voices, job_voices, job_voices, **QUIET)
            for event in voice_events:  # after a voice was added, or the list refreshed
                event.then(page.job_voices, job_voices, job_voices, **QUIET)
    return demo


def _generate_tab(page, i18n) -> tuple[list, tuple]:
    """The Generate tab; returns the voice dropdowns (refreshed on every page load) and
    the events that change the voices (add, refresh)."""
    names = page.voice_names()
    cfg = page.front.cfg
    gr.Markdown(i18n("intro"))
    script = gr.Textbox(
        label=i18n("script"),
        lines=8,
        elem_id="vv-script",
        placeholder=i18n("script_placeholder"),
    )
    # choices, not a slider: a slider's number box takes 0 or 9 and says nothing
    speakers = gr.Radio(
        list(range(1, MAX_SPEAKERS + 1)), value=2, label=i18n("speakers"), elem_id="vv-speakers"
    )
    with gr.Row():
        voices = [
            gr.Dropdown(
                names,
                value=page.default_voice(i),
                label=i18n(f"speaker_voice_{i + 1}"),
                info=None if names else i18n("no_voices"),  # the model's own voice
                visible=i < 2,
                elem_id=f"vv-voice-{i + 1}",
            )
            for i in range(MAX_SPEAKERS)
        ]
    with gr.Accordion(i18n("settings"), open=False):
        cfg_scale = gr.Slider(
            m.MIN_CFG_SCALE, m.MAX_CFG_SCALE, value=1.3, step=0.05, label=i18n("cfg_scale")
        )
        steps = gr.Slider(
            1, m.MAX_INFERENCE_STEPS, value=cfg.inference_steps, step=1, label=i18n("steps")
        )
        seed = gr.Number(-1, precision=0, label=i18n("seed"))
    with gr.Row():
        go = gr.Button(i18n("generate"), variant="primary", elem_id="vv-generate")
        stop = gr.Button(i18n("stop"), variant="stop", elem_id="vv-stop")
    live = gr.HTML("", elem_id="vv-live")
    progress = gr.HTML("", elem_id="vv-progress")
    complete = gr.Audio(
        label=i18n("complete_audio"),
        type="numpy",
        format="wav",
        interactive=False,
        buttons=["download"],
        elem_id="vv-complete",
    )
    gr.Examples(
        [e[1:] for e in EXAMPLES],
        [script, speakers],
        label=i18n("examples"),
        example_labels=[e[0] for e in EXAMPLES],
    )
    with gr.Accordion(i18n("voices"), open=False):
        sample = gr.Audio(
            sources=["upload", "microphone"],
            type="filepath",
            label=i18n("voice_file"),
            elem_id="vv-voice-file",
        )
        with gr.Row():
            vname = gr.Textbox(label=i18n("voice_name"), elem_id="vv-voice-name")
            add = gr.Button(i18n("add_voice"), elem_id="vv-add-voice")
            refresh = gr.Button(i18n("refresh_voices"))
        voice_msg = gr.Markdown("", elem_id="vv-voice-msg")

    speakers.change(
        lambda n: [gr.update(visible=i < int(n)) for i in range(MAX_SPEAKERS)],
        speakers,
        voices,
        **QUIET,
    )
    go.click(
        page.generate,
        [script, speakers, *voices, cfg_scale, steps, seed],
        [live, progress, complete],
        api_name="generate",
        concurrency_limit=page.generate_limit,
        show_progress="minimal",
    )
    # queued, so its gr.Info reaches the tab; no limit, so it never waits behind a Generate
    stop.click(page.stop, None, None, **(QUIET | {"queue": True}))
    added = add.click(
        page.add_voice, [sample, vname, *voices], [*voices, voice_msg], api_visibility="private"
    )
    refreshed = refresh.click(page.refresh_voices, voices, voices, **QUIET)
    return voices, (added, refreshed)
