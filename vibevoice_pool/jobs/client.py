"""The terminal side of durable jobs: `vibevoice-pool synth --async` and
`vibevoice-pool jobs`, over HTTP (httpx).

    submit_and_follow(url, body, output, api_key)
        POST /v1/jobs -> follow(): poll GET /v1/jobs/{id} with a progress bar on
        stderr -> GET /v1/jobs/{id}/audio (resumed with Range if cut) -> output
    follow(url, job_id, output, api_key)   the same for a job already submitted
    list_jobs(url, api_key)                GET /v1/jobs as a table (show_job: one job)
    cancel_job(url, job_id, api_key)       POST /v1/jobs/{id}/cancel (`jobs cancel ID`):
                                           stops it and keeps its record

Ctrl-C stops the following, never the job: it runs on, and `vibevoice-pool
jobs ID -o FILE` picks it up again. A server that restarts meanwhile is waited
for (up to UNREACHABLE_GIVE_UP_S); the job finishes there after its restart.
Exit codes: 0 written (a cancelled job's: the audio it made before, said so), 1
failed / cancelled with no audio / refused, 130 interrupted; `jobs
cancel ID`: 0 when the job is cancelled (now or before), 1 when it had ended
otherwise (done, failed: nothing was cancelled) or was refused.

Jobs belong to their creator. Only a server mints owner tokens: the first
POST /v1/jobs answers one (X-Owner-Token), kept in owner_token_path() (mode
0600) and sent with every call after, so a server without a key lists the
jobs this user made; a server that does not know the token sent mints a new
one, which replaces it. With a key, the key is the owner and the token is ignored.
"""

from __future__ import annotations

import os
import sys
import time
import uuid
from pathlib import Path

import httpx

POLL_S = 1.0
UNREACHABLE_GIVE_UP_S = 300.0  # a restarting server gets this long to come back
DOWNLOAD_TRIES = 5
EXIT_INTERRUPTED = 130
# a done job's stop_reason that means its audio was cut (docs/OPERATIONS.md, "When a
# request stops"): said after the file is written, which it still is
CUT_SHORT = {
    "max_audio": "it reached its max_audio_s, or the server's --max-audio-s",
    "runaway_cap": "the model did not end the speech, and the runaway cap cut it",
    "context": "the model's context was full",
}


OWNER_FILE_ENV = "VIBEVOICE_POOL_OWNER_FILE"


def owner_token_path() -> Path:
    """$VIBEVOICE_POOL_OWNER_FILE, else ~/.cache/vibevoice-pool/owner-token."""
    given = os.environ.get(OWNER_FILE_ENV, "")
    if given:
        return Path(given).expanduser()
    return Path.home() / ".cache" / "vibevoice-pool" / "owner-token"


def owner_token() -> str:
    """This user's owner token, as a server minted it ('' before the first job)."""
    try:
        return owner_token_path().read_text().strip()
    except FileNotFoundError:
        return ""


def keep_owner_token(resp: httpx.Response) -> None:
    """Keep the token a POST /v1/jobs answer minted (mode 0600), replacing the old."""
    token = resp.headers.get("x-owner-token", "")
    if not token or token == owner_token():
        return
    path = owner_token_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(token)
    os.replace(tmp, path)


def _headers(api_key: str | None) -> dict:
    token = owner_token()
    headers = {"X-Owner-Token": token} if token else {}
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    return headers


def _fail(resp: httpx.Response) -> int:
    """Print the server's error (OpenAI-shaped when it is ours); exit code 1."""
    try:
        err = resp.json()["error"]
        _say(f"error {resp.status_code} ({err.get('code')}): {err.get('message')}")
    except (ValueError, KeyError, TypeError):
        _say(f"error {resp.status_code}: {resp.text[:500]}")
    if resp.status_code == 401:
        from vibevoice_pool.client import KEY_HINT

        _say(KEY_HINT)
    return 1


def bar(frac: float, width: int = 20) -> str:
    full = int(round(max(0.0, min(1.0, frac)) * width))
    return "█" * full + "░" * (width - full)


def body_from_args(ns) -> dict:
    """The /v1/jobs body from `synth`'s flags (the same as synth's own)."""
    from vibevoice_pool.client import check_output, output_format, read_script, synth_body

    text = read_script(ns.script)
    if ns.output:
        check_output(ns.output)
    return synth_body(ns, text, output_format(ns.format, ns.output))


def _say(line: str) -> None:
    print(line, file=sys.stderr)


def _progress_line(job: dict, t0: float) -> str:
    p = job["progress"]
    worker = job.get("worker")
    where = f" on worker {worker}" if worker is not None else ""
    if job.get("waiting"):  # preempted, moved, its worker lost: it waits to resume
        where = f" ({job['waiting']['reason'].replace('_', ' ')}: waits to resume)"
    if p.get("eta_s") is not None:
        where += f", ~{p['eta_s']:.0f} s left"
    return (
        f"\r[{bar(p['fraction'])}] {job['state']:<9} {p['audio_s']:6.1f} of ~"
        f"{p['estimate_s']:.0f} s of audio{where}, {time.monotonic() - t0:5.0f} s "
    )


def submit_and_follow(url: str, body: dict, output: str, api_key: str | None = None) -> int:
    # one Idempotency-Key for this submission: a retry after a lost answer is the same job
    headers = {**_headers(api_key), "Idempotency-Key": f"vvp-cli-{uuid.uuid4()}"}
    for attempt in (1, 2):
        try:
            r = httpx.post(f"{url}/v1/jobs", json=body, headers=headers, timeout=60)
            break
        except httpx.HTTPError as e:
            if attempt == 2 or isinstance(e, httpx.ConnectError):  # nothing was sent
                _say(f"cannot reach {url}: {e}")
                return 1
            _say(f"no answer from {url} ({type(e).__name__}); sending it again")
    if r.status_code != 202:
        return _fail(r)
    keep_owner_token(r)
    job_id = r.json()["id"]
    _say(f"job {job_id} submitted; it runs on even if this command stops")
    return follow(url, job_id, output, api_key)


def follow(url: str, job_id: str, output: str, api_key: str | None = None) -> int:
    """Wait for a job with a progress bar, then write its audio to `output`."""
    t0 = time.monotonic()
    lost_since: float | None = None
    try:
        while True:
            try:
                r = httpx.get(f"{url}/v1/jobs/{job_id}", headers=_headers(api_key), timeout=10)
            except httpx.TransportError as e:
                lost_since = lost_since or time.monotonic()
                if time.monotonic() - lost_since > UNREACHABLE_GIVE_UP_S:
                    _say(f"\ncannot reach {url} ({e}); the job may still finish: {_resume(job_id)}")
                    return 1
                print(f"\rthe server is not answering; still trying ({e})", end="", file=sys.stderr)
                time.sleep(POLL_S)
                continue
            lost_since = None
            if r.status_code != 200:
                print(file=sys.stderr)
                return _fail(r)
            job = r.json()
            print(_progress_line(job, t0), end="", file=sys.stderr)
            if job["state"] == "done":
                print(file=sys.stderr)
                return _download(url, job, output, api_key)
            if job["state"] == "cancelled" and job.get("result"):  # the audio it made
                _say(f"\njob {job_id} was cancelled; writing the audio it made before")
                return _download(url, job, output, api_key)
            if job["state"] in ("failed", "cancelled"):
                err = job.get("error") or {}
                _say(f"\njob {job_id} {job['state']}: {err.get('code')}: {err.get('message')}")
                return 1
            time.sleep(POLL_S)
    except KeyboardInterrupt:
        _say(f"\nstopped following; job {job_id} runs on: {_resume(job_id)}")
        return EXIT_INTERRUPTED


def _resume(job_id: str) -> str:
    return f"`vibevoice-pool jobs {job_id} -o FILE` fetches it later"


def _download(url: str, job: dict, output: str, api_key: str | None) -> int:
    """Fetch the result into `output` (via a temporary file), resuming with Range."""
    total = job["result"]["bytes"]
    tmp = f"{output}.part"
    got = 0
    with open(tmp, "wb") as f:
        for _ in range(DOWNLOAD_TRIES):
            headers = _headers(api_key) | ({"Range": f"bytes={got}-"} if got else {})
            try:
                with httpx.stream(
                    "GET", f"{url}{job['result']['url']}", headers=headers, timeout=60
                ) as r:
                    if r.status_code == 200:
                        f.seek(0)
                        f.truncate()
                        got = 0
                    elif r.status_code != 206:
                        r.read()
                        os.unlink(tmp)
                        return _fail(r)
                    for data in r.iter_bytes():
                        f.write(data)
                        got += len(data)
            except httpx.TransportError as e:
                _say(f"download cut at {got} of {total} bytes ({e}); resuming")
                time.sleep(POLL_S)
                continue
            if got >= total:
                break
    if got != total:
        os.unlink(tmp)
        _say(f"could not download the result of job {job['id']}: {_resume(job['id'])}")
        return 1
    os.replace(tmp, output)
    _say(f"wrote {output}: {job['result']['audio_s']:.2f} s, seed {job['seed']}, job {job['id']}")
    reason = job.get("stop_reason")
    if reason in CUT_SHORT:
        _say(f"note: the audio stops before the script's end ({reason}): {CUT_SHORT[reason]}")
    return 0


def jobs_table(jobs: list[dict]) -> str:
    lines = [f"{'job':<32}  {'state':<9}  {'progress':<26}  {'audio':>8}  submitted"]
    for j in jobs:
        p = j["progress"]
        when = time.strftime("%Y-%m-%d %H:%M", time.localtime(j["timings"]["created_at"]))
        audio = f"{j['result']['audio_s']:.1f} s" if j.get("result") else ""
        lines.append(
            f"{j['id']:<32}  {j['state']:<9}  [{bar(p['fraction'], 10)}] "
            f"{p['audio_s']:5.1f}/{p['estimate_s']:<5.0f}s  {audio:>8}  {when}"
        )
        if j.get("error"):
            lines.append(f"{'':<32}  {j['error']['code']}: {j['error']['message']}")
        if j.get("waiting"):
            lines.append(f"{'':<32}  {j['waiting']['reason']}: waits to resume")
    return "\n".join(lines)


def _ask(method: str, url: str, path: str, api_key: str | None, **kw) -> httpx.Response | int:
    """A 200 answer, else the exit code once what went wrong is said."""
    try:
        r = httpx.request(method, url + path, headers=_headers(api_key), **kw)
    except httpx.HTTPError as e:
        _say(f"cannot reach {url}: {e}")
        return 1
    return r if r.status_code == 200 else _fail(r)


def show_job(url: str, job_id: str, api_key: str | None = None) -> int:
    """Print one job's row (the id is what fetches it; with named keys, only its own)."""
    r = _ask("GET", url, f"/v1/jobs/{job_id}", api_key, timeout=10)
    if isinstance(r, int):
        return r
    print(jobs_table([r.json()]))
    return 0


def list_jobs(url: str, api_key: str | None = None, limit: int = 20) -> int:
    """Print the caller's jobs (this API key's, or this owner token's), newest first."""
    r = _ask("GET", url, "/v1/jobs", api_key, params={"limit": limit}, timeout=10)
    if isinstance(r, int):
        return r
    page = r.json()
    print(jobs_table(page["data"]) if page["data"] else "no jobs")
    if page["has_more"]:
        print(f"(newest {limit} shown; --limit for more)")
    return 0


def cancel_job(url: str, job_id: str, api_key: str | None = None) -> int:
    """Cancel a job and print its row; see the exit codes in the module doc."""
    r = _ask("POST", url, f"/v1/jobs/{job_id}/cancel", api_key, timeout=30)
    if isinstance(r, int):
        return r
    job = r.json()
    print(jobs_table([job]))
    if job["state"] != "cancelled":
        _say(f"job {job_id} had already ended ({job['state']}): nothing to cancel")
        return 1
    kept = job.get("result")
    made = f"; its {kept['audio_s']:.1f} s of audio: `vibevoice-pool jobs {job_id} -o FILE`"
    _say(f"job {job_id} cancelled{made if kept else ''}; its record stays until it expires")
    return 0


def run(ns) -> int:
    """The CLI's entry: `synth --async`, `jobs [ID -o FILE]` or `jobs cancel ID`."""
    if ns.command == "synth":
        from vibevoice_pool.client import ClientError

        try:
            body = body_from_args(ns)
        except ClientError as e:
            print(f"vibevoice-pool synth: {e}", file=sys.stderr)
            return 1
        return submit_and_follow(ns.url, body, ns.output, ns.api_key)
    if ns.job_id == "cancel" or ns.cancel_id:
        if ns.job_id != "cancel" or not ns.cancel_id:
            _say("usage: vibevoice-pool jobs cancel ID")
            return 2
        return cancel_job(ns.url, ns.cancel_id, ns.api_key)
    if ns.job_id and ns.output:
        return follow(ns.url, ns.job_id, ns.output, ns.api_key)
    if ns.job_id:
        return show_job(ns.url, ns.job_id, ns.api_key)
    return list_jobs(ns.url, ns.api_key, ns.limit)
