"""The page in a real headless Chromium (Debian's, through Playwright).

Open the page, write a two-speaker script, pick voices, generate: the live
player streams and the complete audio appears. The panel shows every worker;
a SIGKILLed worker shows as recovering, then ready. Stop in one tab leaves
another tab's request running. Screenshots go to artifacts/screenshots/.
"""

from __future__ import annotations

import os
import shutil
import signal

import httpx
import pytest
from conftest import ROOT, wait_until
from serving import ALICE, BOB, named_keys_server, running_server

pytestmark = pytest.mark.browser

CHROMIUM = "/usr/bin/chromium"
FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
SHOTS = ROOT / "artifacts" / "screenshots"
TWO_SPEAKERS = "Speaker 1: Good morning, and welcome.\nSpeaker 2: Thank you, it is good to be here."
# About 30 s of audio: at --sim-rtf 0.25 it takes about 7 s to make.
LONG = "\n".join(
    f"Speaker {1 + i % 2}: This is line {i} of a long conversation, said slowly." for i in range(9)
)
TIMEOUT_MS = 60_000

if not shutil.which(CHROMIUM):  # `make test` installs it; a missing browser is a failure
    raise RuntimeError("Debian's chromium is not installed: apt-get install chromium")


@pytest.fixture(scope="module")
def srv(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("browser")
    with running_server(tmp, "--sim-rtf", "0.25", "--sim-boot-s", "2") as s:
        yield s


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    from playwright.sync_api import sync_playwright

    tmp = tmp_path_factory.mktemp("chromium")
    (tmp / "home").mkdir()
    (tmp / "tmp").mkdir()
    env = dict(os.environ, HOME=str(tmp / "home"), TMPDIR=str(tmp / "tmp"))
    SHOTS.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=FLAGS, env=env)
        yield b
        b.close()


def open_page(browser, srv, locale: str = "en-US"):
    context = browser.new_context(locale=locale, viewport={"width": 1400, "height": 1000})
    page = context.new_page()
    page.set_default_timeout(TIMEOUT_MS)
    page.goto(srv.url + "/")
    page.wait_for_selector("#vv-panel .vv-worker")
    return page


def workers(srv) -> list[dict]:
    return srv.get("/v1/pool").json()["workers"]


def wait_all_ready(srv) -> None:
    wait_until(
        lambda: all(w["state"] == "ready" for w in workers(srv)), 60, 0.2, "all workers ready"
    )


def pick_voice(page, n: int, voice: str) -> None:
    page.click(f"#vv-voice-{n} input")
    page.click(f"ul[role=listbox] li:has-text('{voice}')")
    assert page.input_value(f"#vv-voice-{n} input") == voice


def generate(page, script: str) -> None:
    page.fill("#vv-script textarea", script)
    page.click("#vv-generate")


def test_two_speakers_generate_and_the_audio_appears(browser, srv):
    page = open_page(browser, srv)
    try:
        _generate_two_speakers(srv, page)
    finally:
        page.context.close()


def _generate_two_speakers(srv, page) -> None:
    page.wait_for_selector("#vv-panel .vv-worker >> nth=1")
    assert page.locator("#vv-panel .vv-worker").count() == len(workers(srv)) == 2
    pick_voice(page, 1, "demo-Carol_woman")
    pick_voice(page, 2, "demo-Dave_man")
    generate(page, TWO_SPEAKERS)
    live = page.wait_for_selector("#vv-live audio[src*='ui/stream/']", state="attached")
    page.wait_for_selector("#vv-progress [data-state=done]")
    page.wait_for_selector("#vv-complete audio[src]", state="attached")
    assert "seed" in page.inner_text("#vv-progress")
    stream = httpx.get(f"{srv.url}/{live.get_attribute('src')}", timeout=30)
    assert stream.content[:4] == b"RIFF" and len(stream.content) > 24000 * 2  # over 1 s
    page.wait_for_timeout(1500)  # let the charts draw a point or two
    page.screenshot(path=str(SHOTS / "page-generated.png"), full_page=True)


def test_the_panel_shows_a_killed_worker_recovering_then_ready(browser, srv):
    wait_all_ready(srv)
    page = open_page(browser, srv)
    try:
        _kill_and_watch(srv, page)
    finally:
        page.context.close()


def _kill_and_watch(srv, page) -> None:
    victim = workers(srv)[0]
    block = "#vv-panel .vv-worker[data-worker='0']"
    page.wait_for_selector(f"{block}[data-state=ready]")
    os.kill(victim["pid"], signal.SIGKILL)  # a worker of the server this test started
    page.wait_for_selector(f"{block}[data-state=recovering]")
    page.screenshot(path=str(SHOTS / "panel-recovering.png"))
    assert "♻️" in page.inner_text(block)
    page.wait_for_selector(f"{block}[data-state=ready][data-restarts='1']", timeout=90_000)
    assert workers(srv)[0]["pid"] != victim["pid"]
    page.screenshot(path=str(SHOTS / "panel-recovered.png"))


def test_stop_in_one_tab_leaves_the_other_tabs_request_running(browser, srv):
    wait_all_ready(srv)
    before = cancelled_count(srv)
    mine = open_page(browser, srv, "en-US")
    theirs = open_page(browser, srv, "zh-CN")
    try:
        _stop_one_of_two(srv, mine, theirs, before)
    finally:
        mine.context.close()
        theirs.context.close()


def _stop_one_of_two(srv, mine, theirs, before: float) -> None:
    theirs.wait_for_selector("#vv-panel .vv-panel-title:has-text('GPU状态监控')")  # Chinese
    mine.wait_for_selector("#vv-panel .vv-panel-title:has-text('GPU status')")
    assert theirs.locator("#vv-generate:has-text('生成')").count() == 1  # labels too
    generate(mine, LONG)
    generate(theirs, LONG)
    mine.wait_for_selector("#vv-progress [data-state=running]")
    theirs.wait_for_selector("#vv-progress [data-state=running]")
    # The live player has audio to play while the request is still being made.
    theirs.wait_for_function("document.querySelector('#vv-live audio').readyState >= 2")
    assert theirs.locator("#vv-progress [data-state=running]").count() == 1
    mine.click("#vv-stop")
    mine.wait_for_selector("#vv-progress [data-state=stopped]")
    assert theirs.locator("#vv-progress [data-state=stopped]").count() == 0
    theirs.screenshot(path=str(SHOTS / "other-tab-running-zh.png"), full_page=True)
    theirs.wait_for_selector("#vv-progress [data-state=done]", timeout=120_000)
    theirs.wait_for_selector("#vv-complete audio[src]", state="attached")
    assert mine.locator("#vv-progress [data-state=done]").count() == 0
    assert cancelled_count(srv) == before + 1  # exactly one request was stopped: this tab's


def cancelled_count(srv) -> float:
    from prometheus_client.parser import text_string_to_metric_families

    for family in text_string_to_metric_families(srv.get("/metrics").text):
        if family.name == "vibevoice_pool_requests":
            return sum(s.value for s in family.samples if s.labels.get("outcome") == "cancelled")
    return 0.0


def test_a_refused_voice_leaves_the_speakers_voices_as_they_were(browser, srv):
    page = open_page(browser, srv)
    try:
        pick_voice(page, 1, "demo-Carol_woman")
        page.get_by_text("Add a voice", exact=True).click()  # open its accordion
        page.click("#vv-add-voice")  # no file chosen: refused
        page.wait_for_selector("#vv-voice-msg:has-text('Choose an audio file first')")
        page.wait_for_timeout(500)
        assert page.input_value("#vv-voice-1 input") == "demo-Carol_woman"
        pick_voice(page, 1, "demo-Dave_man")  # still usable, not covered by an error badge
        page.screenshot(path=str(SHOTS / "voice-refused.png"), full_page=True)
    finally:
        page.context.close()


def test_the_jobs_tab_speaks_chinese_on_a_chinese_browser(browser, srv):
    page = open_page(browser, srv, "zh-CN")
    try:
        page.get_by_role("tab", name="任务").click()
        page.wait_for_selector("text=提交任务")
        assert page.get_by_role("tab", name="Jobs").count() == 0
        page.wait_for_selector("#vv-jobs-table th:has-text('状态')")  # its table too
        page.get_by_role("tab", name="生成").click()
        page.click("#vv-stop")  # nothing running: the tab is told so, in Chinese
        page.wait_for_selector("text=此标签页没有正在进行的请求")
        assert _toast_title(page, "info") == "提示"  # the toast's title too
        page.get_by_text("添加声音", exact=True).click()
        page.click("#vv-add-voice")  # no file chosen: refused in Chinese
        page.wait_for_selector("#vv-voice-msg:has-text('请先选择一个音频文件')")
        assert _toast_title(page, "warning") == "警告"
    finally:
        page.context.close()


def _toast_title(page, kind: str) -> str:
    """The title a toast shows (Gradio writes its kind; the page's CSS draws its own)."""
    title = page.wait_for_selector(f".toast-title.{kind}")
    shown = title.evaluate("e => getComputedStyle(e, '::after').content")
    return shown.strip('"') if shown != "none" else title.inner_text()


def test_the_number_of_speakers_is_a_choice_of_one_to_four_and_shows_that_many_voices(browser, srv):
    page = open_page(browser, srv)
    try:  # no box to type 0 or 9 into, which a slider's number box took and ignored
        assert page.locator("#vv-speakers input[type=number]").count() == 0
        assert page.locator("#vv-speakers input[type=radio]").count() == 4
        for n in (3, 1, 4):
            page.locator("#vv-speakers label", has_text=str(n)).click()
            wait_until(
                lambda n=n: (
                    [page.locator(f"#vv-voice-{i}").is_visible() for i in range(1, 5)]
                    == [i <= n for i in range(1, 5)]
                ),
                10,
                0.1,
                f"{n} voices shown",
            )
    finally:
        page.context.close()


def test_the_jobs_table_scrolls_on_a_phone_rather_than_break_its_words(browser, srv):
    context = browser.new_context(
        viewport={"width": 390, "height": 844}, is_mobile=True, has_touch=True
    )
    page = context.new_page()
    try:
        page.set_default_timeout(TIMEOUT_MS)
        page.goto(srv.url + "/")
        page.get_by_role("tab", name="Jobs").click()
        table = page.wait_for_selector("#vv-jobs-table table")
        # squeezed into the phone's width, each column was a letter or two wide
        assert table.bounding_box()["width"] >= 700
        page.screenshot(path=str(SHOTS / "jobs-phone.png"), full_page=True)
    finally:
        context.close()


# ---- a login under a key's name is that key on the page -------------------------


@pytest.fixture(scope="module")
def named(tmp_path_factory):
    with named_keys_server(tmp_path_factory.mktemp("browser-named")) as s:
        yield s


def _bearer(key: str) -> dict:
    return {"Authorization": f"Bearer {key}"}


def _jobs_of(srv, key: str) -> list[str]:
    r = srv.get("/v1/jobs", headers=_bearer(key))
    return [j["id"] for j in r.json()["data"]]


def _alices_jobs_tab(context, named):
    ok = context.request.post(named.url + "/login", form={"username": "alice", "password": ALICE})
    assert ok.status == 200
    page = context.new_page()
    page.set_default_timeout(TIMEOUT_MS)
    page.goto(named.url + "/")
    page.get_by_role("tab", name="Jobs").click()
    return page


def test_a_login_under_a_keys_name_lists_and_submits_that_keys_jobs(browser, named):
    r = named.post("/v1/jobs", json={"script": "Speaker 1: from the API"}, headers=_bearer(ALICE))
    api_job = r.json()["id"]
    context = browser.new_context(viewport={"width": 1400, "height": 1000})
    try:
        # another key may not take alice's name; her own key may
        assert (
            context.request.post(
                named.url + "/login", form={"username": "alice", "password": BOB}
            ).status
            >= 400
        )
        page = _alices_jobs_tab(context, named)
        page.wait_for_selector(f"#vv-jobs-table td:has-text('{api_job}')", state="attached")
        page.fill("#vv-job-script textarea", "Speaker 1: from the page")
        page.click("#vv-job-submit")
        page.wait_for_selector("#vv-job-msg:has-text('queued')")
        wait_until(lambda: len(_jobs_of(named, ALICE)) == 2, 30, 0.2, "the page's job listed")
        assert _jobs_of(named, BOB) == []
    finally:
        context.close()


def test_the_jobs_tab_cancels_a_running_job_keeping_it_then_deletes_it(browser, named):
    """Cancel (the job stays, cancelled, with the audio it made) and Delete, clicked."""
    script = "Speaker 1: " + "a sentence that goes on for quite a while, " * 100  # ~5 min
    job = named.post("/v1/jobs", json={"script": script}, headers=_bearer(ALICE)).json()["id"]

    def state() -> str:
        r = named.get(f"/v1/jobs/{job}", headers=_bearer(ALICE))
        return r.json()["state"] if r.status_code == 200 else str(r.status_code)

    context = browser.new_context(viewport={"width": 1400, "height": 1000})
    try:
        page = _alices_jobs_tab(context, named)
        wait_until(lambda: state() == "running", 30, 0.1, "the job to run")
        page.fill("#vv-job-id :is(input, textarea)", job)
        page.click("#vv-job-cancel")
        page.wait_for_selector("#vv-job-msg:has-text('cancelled.')")
        wait_until(lambda: state() == "cancelled", 30, 0.2, "the job to be cancelled")
        assert named.get(f"/v1/jobs/{job}/audio", headers=_bearer(ALICE)).status_code == 200
        page.click("#vv-job-delete")
        page.wait_for_selector("#vv-job-msg:has-text('deleted')")
        assert state() == "404"
    finally:
        context.close()
