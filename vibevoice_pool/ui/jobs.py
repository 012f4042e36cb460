"""The page's Jobs tab: long scripts as durable jobs, listed per browser.

    Submit job -> JobRunner.submit(owner, body)  (what POST /v1/jobs does)
    every 2 s (gr.Timer, queue=False): the owner's jobs -> the table (state,
        progress as audio made against the estimate), results (done jobs', and the
        audio cancelled ones made) -> the download list (gr.File, from the results folder)
    Cancel -> JobRunner.cancel(id): it stops, its record (and the audio it made) stays
    Delete -> cancel it if it is active, then forget it and its result (DELETE /v1/jobs/{id})
    both for a job of that owner only

The owner (`page_owner`): a login whose user name is a key's name (auth.page_login
lets only that key in under it) acts as that key, so its jobs are the ones the
API lists for the key, on every browser; otherwise the jobs are this browser's
("browser:<id>"). The browser id is kept in the browser's localStorage (gr.BrowserState, with a
secret kept in the data folder so it still reads after a restart): closing
the tab or restarting the server loses nothing. The id is made on the server
(never taken from a request header), so no API caller can act as a browser.
Call `add_jobs_tab` inside a gr.Blocks().
"""

from __future__ import annotations

import contextlib
import time
import uuid
from pathlib import Path

import gradio as gr

from vibevoice_pool.jobs.disk import kept_secret
from vibevoice_pool.jobs.runner import JobRunner
from vibevoice_pool.jobs.store import JobError
from vibevoice_pool.ui.i18n import explain, language_of, t
from workers.wire.messages import PoolError

REFRESH_S = 2.0
MAX_ROWS = 50
# The table keeps its width on a phone and scrolls sideways: squeezed, its headers
# and ids broke a letter a line.
JOBS_CSS = """
#vv-jobs-table table { min-width: 760px; }
"""
FORMATS = ["wav", "mp3", "flac", "opus", "aac"]
SECRET_FILE = "page.secret"


def owner_for(browser_id: str) -> str:
    return f"browser:{browser_id}"


def page_owner(keys, user: str | None, browser_id: str) -> str:
    """Whose jobs the tab shows: the key named by the login's user name, else the browser's."""
    caller = keys.by_name(user) if keys else None
    return caller.owner if caller is not None else owner_for(browser_id)


def _secret(folder: Path) -> str:
    """A secret for the browser id, made once and kept in the data folder."""
    return kept_secret(folder / SECRET_FILE, 16).decode()


def job_table(runner: JobRunner, owner: str, lang: str = "en") -> tuple[dict, list[str]]:
    """The table (its headers and rows, in `lang`) and the files of the done jobs."""
    rows, files = job_rows(runner, owner, lang)
    return {"headers": t(lang, "jobs_columns").split("|"), "data": rows}, files


def job_rows(runner: JobRunner, owner: str, lang: str = "en") -> tuple[list[list[str]], list[str]]:
    """The table rows of an owner's jobs (newest first) and the files of the done ones."""
    jobs, _ = runner.store.list(owner, limit=MAX_ROWS)
    rows, files = [], []
    for job in jobs:
        d = runner.describe(job)
        p = d["progress"]
        rows.append(
            [
                job.id,
                t(lang, f"job.{d['state']}")
                + (f" ({t(lang, 'job.' + d['waiting']['reason'])})" if d.get("waiting") else ""),
                t(
                    lang,
                    "job_progress",
                    pct=100 * p["fraction"],
                    made=p["audio_s"],
                    est=p["estimate_s"],
                ),
                f"{job.audio_s:.1f} s" if job.result_path else "",  # a cancelled one's too
                time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(job.created_at)),
                explain(lang, job.error_code or "", job.error or ""),
            ]
        )
        if job.result_path:  # done, or cancelled with the audio it made
            try:
                files.append(str(runner.result_file(job)))
            except JobError:
                pass  # expired or removed from disk
    return rows, files


def submit_job(
    runner: JobRunner,
    owner: str,
    script: str,
    voices: list[str] | None,
    fmt: str,
    lang: str = "en",
) -> str:
    """Submit from the page; a line for the page (in `lang`) either way."""
    body = {
        "script": script or "",
        "speakers": [{"voice": v} for v in voices or []],
        "format": fmt or "wav",
    }
    try:
        job = runner.submit(owner, body)
    except (PoolError, JobError) as e:
        return f"❌ {explain(lang, e.kind.value, e.message)}"
    return t(lang, "job_queued", id=job.id, secs=job.est_audio_s)


def _owned(runner: JobRunner, owner: str, job_id: str):
    """The owner's job of that id, or None (no such job, or another's)."""
    job = runner.store.get(job_id) if job_id else None
    return job if job is not None and job.owner == owner else None


def cancel_job(runner: JobRunner, owner: str, job_id: str, lang: str = "en") -> str:
    job_id = (job_id or "").strip()
    if _owned(runner, owner, job_id) is None:
        return t(lang, "job_not_yours", id=job_id)
    try:
        runner.cancel(job_id)
    except JobError as e:
        return f"❌ {explain(lang, e.kind.value, e.message)}"
    return t(lang, "job_cancelled", id=job_id)


def delete_job(runner: JobRunner, owner: str, job_id: str, lang: str = "en") -> str:
    job_id = (job_id or "").strip()
    job = _owned(runner, owner, job_id)
    if job is None:
        return t(lang, "job_not_yours", id=job_id)
    try:
        if not job.finished:
            with contextlib.suppress(JobError):  # it may end meanwhile: forget it anyway
                runner.cancel(job_id)
        runner.store.delete(job_id)
    except JobError as e:
        return f"❌ {explain(lang, e.kind.value, e.message)}"
    return t(lang, "job_deleted", id=job_id)


def add_jobs_tab(front, runner: JobRunner, i18n) -> gr.Dropdown:
    """Build the Jobs tab (inside a gr.Blocks() context); returns its voices list, which
    the page refreshes with its own."""
    gr.set_static_paths([runner.store.results])  # the download list serves results from there
    with gr.Tab(i18n("tab_jobs")):
        gr.Markdown(i18n("jobs_intro"))
        browser = gr.BrowserState(
            "", storage_key="vibevoice-pool-browser", secret=_secret(runner.store.folder)
        )
        with gr.Row():
            script = gr.Textbox(
                label=i18n("script"),
                lines=6,
                placeholder="Speaker 1: ...\nSpeaker 2: ...",
                scale=3,
                elem_id="vv-job-script",
            )
            with gr.Column(scale=1):
                voices = gr.Dropdown(  # its choices: the page's, on load and on each refresh
                    choices=front.voices.names(), multiselect=True, label=i18n("jobs_voices")
                )
                fmt = gr.Dropdown(FORMATS, value="wav", label=i18n("jobs_format"))
                submit = gr.Button(i18n("jobs_submit"), variant="primary", elem_id="vv-job-submit")
        message = gr.Markdown(elem_id="vv-job-msg")
        table = gr.Dataframe(
            headers=t("en", "jobs_columns").split("|"),  # each browser's language at refresh
            value=[],
            interactive=False,
            wrap=True,
            label=i18n("jobs_table"),
            pinned_columns=1,  # the job id stays in view when a phone scrolls it
            elem_id="vv-jobs-table",  # JOBS_CSS: a narrow screen scrolls it, never squeezes it
        )
        with gr.Row():
            cancel_id = gr.Textbox(
                label=i18n("jobs_cancel_id"), placeholder="job id", scale=3, elem_id="vv-job-id"
            )
            cancel = gr.Button(i18n("jobs_cancel"), scale=1, elem_id="vv-job-cancel")
            delete = gr.Button(i18n("jobs_delete"), scale=1, elem_id="vv-job-delete")
        files = gr.File(label=i18n("jobs_files"), file_count="multiple", interactive=False)
        shown = gr.State(())  # the files on show: the list is replaced only when they change
        timer = gr.Timer(REFRESH_S)

        def ensure(browser_id: str) -> str:
            return browser_id or uuid.uuid4().hex

        def owner(browser_id: str, request: gr.Request | None) -> str:
            return page_owner(
                getattr(front, "keys", None), getattr(request, "username", None), browser_id
            )

        def refresh(browser_id, on_show, request: gr.Request = None):
            browser_id = ensure(browser_id)
            shown_now, done = job_table(runner, owner(browser_id, request), language_of(request))
            if tuple(done) == tuple(on_show):
                return browser_id, shown_now, gr.skip(), on_show
            return browser_id, shown_now, done, tuple(done)

        def on_submit(browser_id, text, chosen, chosen_fmt, request: gr.Request = None):
            browser_id, lang = ensure(browser_id), language_of(request)
            mine = owner(browser_id, request)
            return browser_id, submit_job(runner, mine, text, chosen, chosen_fmt, lang)

        def on_cancel(browser_id, job_id, request: gr.Request = None):
            mine = owner(ensure(browser_id), request)
            return cancel_job(runner, mine, job_id, language_of(request))

        def on_delete(browser_id, job_id, request: gr.Request = None):
            mine = owner(ensure(browser_id), request)
            return delete_job(runner, mine, job_id, language_of(request))

        timer.tick(
            refresh,
            [browser, shown],
            [browser, table, files, shown],
            queue=False,
            concurrency_limit=None,
            show_progress="hidden",
            api_visibility="private",
        )
        submit.click(
            on_submit, [browser, script, voices, fmt], [browser, message], api_visibility="private"
        ).then(
            refresh,
            [browser, shown],
            [browser, table, files, shown],
            queue=False,
            api_visibility="private",
        )
        for button, act in ((cancel, on_cancel), (delete, on_delete)):
            button.click(act, [browser, cancel_id], [message], api_visibility="private").then(
                refresh,
                [browser, shown],
                [browser, table, files, shown],
                queue=False,
                api_visibility="private",
            )
    return voices
