"""The terminal side: `vibevoice-pool synth`, `status` and `scale`, talking to a
running server over HTTP (httpx). `status` prints the page's GPU panel as text."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import httpx
import numpy as np

from workers.wire.estimate import audio_seconds_for
from workers.wire.messages import SAMPLE_RATE


def _headers(api_key: str | None) -> dict:
    return {"Authorization": f"Bearer {api_key}"} if api_key else {}


API_KEY_ENV = "VIBEVOICE_POOL_API_KEY"  # --api-key's default, as the server reads it
KEY_HINT = f"give the server's key with --api-key KEY (or in ${API_KEY_ENV})"


def _fail(resp: httpx.Response) -> int:
    try:
        err = resp.json()["error"]
        print(
            f"error {resp.status_code} ({err.get('code')}): {err.get('message')}", file=sys.stderr
        )
    except (ValueError, KeyError, TypeError):
        print(f"error {resp.status_code}: {resp.text[:500]}", file=sys.stderr)
    if resp.status_code == 401:
        print(KEY_HINT, file=sys.stderr)
    return 1


class ClientError(Exception):
    """What the terminal says in one line (exit 1) before any request is sent."""


LOCAL_FORMATS = {"wav": "WAV", "flac": "FLAC", "mp3": "MP3"}  # encoded here from the PCM
SERVER_FORMATS = ("pcm", "opus", "aac")  # streamed as the server encodes them
# -o's extension -> the format written when --format is not given
EXTENSION_FORMATS = {
    ".wav": "wav",
    ".flac": "flac",
    ".mp3": "mp3",
    ".opus": "opus",
    ".ogg": "opus",
    ".aac": "aac",
    ".pcm": "pcm",
    ".raw": "pcm",
}


def output_format(fmt: str | None, output: str | None) -> str:
    """--format as given; without it, the format -o's extension names (out.mp3: mp3),
    else wav. (A WAV was written into out.mp3 and out.flac.)"""
    if fmt:
        return fmt.strip().lower()
    return EXTENSION_FORMATS.get(Path(output or "").suffix.lower(), "wav")


def read_script(path: str) -> str:
    """The script of `synth --script` (- for stdin); ClientError when it cannot be read."""
    try:
        return sys.stdin.read() if path == "-" else Path(path).read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ClientError(f"{path}: not UTF-8 text (byte {e.start})") from None
    except OSError as e:
        raise ClientError(f"{path}: {e.strerror}") from None


def check_output(path: str) -> None:
    """ClientError when `path` cannot be written: found before the GPU does the work."""
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise ClientError(f"{path}: no folder {folder}")
    if not os.access(folder, os.W_OK) or os.path.isdir(path):
        raise ClientError(f"{path}: cannot be written")


def synth_body(ns, text: str, fmt: str) -> dict:
    """The body `synth`'s flags make (--steps 0 is sent, for the server to refuse)."""
    body = {
        "script": text,
        "speakers": [{"voice": v} for v in ns.voice],
        "cfg_scale": ns.cfg_scale,
        "format": fmt,
    }
    if ns.steps is not None:
        body["inference_steps"] = ns.steps
    if ns.seed is not None:
        body["seed"] = ns.seed
    return body


def synth(ns) -> int:
    fmt = output_format(ns.format, ns.output)
    if fmt not in LOCAL_FORMATS and fmt not in SERVER_FORMATS:
        raise ClientError(
            f"--format {ns.format}: one of {', '.join([*LOCAL_FORMATS, *SERVER_FORMATS])}"
        )
    text = read_script(ns.script)
    check_output(ns.output)
    body = synth_body(ns, text, "pcm" if fmt in LOCAL_FORMATS else fmt) | {"stream": True}
    est = audio_seconds_for(text)
    got = bytearray()
    t0 = time.monotonic()
    timeout = httpx.Timeout(10.0, read=None)
    with httpx.stream(
        "POST", f"{ns.url}/v1/synthesize", json=body, headers=_headers(ns.api_key), timeout=timeout
    ) as r:
        if r.status_code != 200:
            r.read()
            return _fail(r)
        worker, seed = r.headers.get("x-worker", "?"), r.headers.get("x-seed", "?")
        try:
            _receive(r, body["format"], fmt, got, est, worker, t0)
        except httpx.RemoteProtocolError:  # a stream cut after its headers (speech.CutStream)
            print(file=sys.stderr)
            raise ClientError(
                f"the stream ended before the audio's end ({len(got)} bytes in): the request "
                "failed on the server after it began (the server's log says why), or the "
                "connection dropped; nothing was written (--async runs it as a job, which "
                "says why it failed)"
            ) from None
    print(file=sys.stderr)
    if fmt not in LOCAL_FORMATS:  # the server's own bytes: pcm, opus, aac
        Path(ns.output).write_bytes(bytes(got))
        print(f"wrote {ns.output}: {len(got)} bytes of {fmt}, seed {seed}")
        return 0
    pcm = np.frombuffer(bytes(got[: len(got) // 2 * 2]), dtype="<i2")
    import soundfile as sf

    sf.write(ns.output, pcm, SAMPLE_RATE, format=LOCAL_FORMATS[fmt])
    print(f"wrote {ns.output}: {len(pcm) / SAMPLE_RATE:.2f} s, seed {seed}")
    return 0


def _receive(r, sent: str, fmt: str, got: bytearray, est: float, worker: str, t0: float) -> None:
    """Read the streamed audio into `got`, with a progress line on stderr."""
    for data in r.iter_bytes():
        got.extend(data)
        made = (
            f"{len(got) / 2 / SAMPLE_RATE:6.1f} s of audio"
            if sent == "pcm"
            else f"{len(got) / 1024:7.0f} KiB of {fmt}"
        )
        secs = len(got) / 2 / SAMPLE_RATE if sent == "pcm" else 0.0
        bar = "#" * int(20 * min(1.0, secs / est)) if est else ""
        print(
            f"\r[{bar:<20}] {made} (about {est:.0f} s expected) "
            f"on worker {worker}, {time.monotonic() - t0:5.1f} s",
            end="",
            file=sys.stderr,
        )


def status_table(pool: dict, lang: str | None = None) -> str:
    """The page's GPU status panel as a table (ui/panel.py), in $LANG's language (zh or en)."""
    from vibevoice_pool.ui.panel import render_table

    if lang is None:
        env = os.environ.get("LC_ALL") or os.environ.get("LANG") or ""
        lang = "zh" if env.lower().startswith("zh") else "en"
    return render_table(pool, lang)


def status(ns) -> int:
    r = httpx.get(f"{ns.url}/v1/pool", headers=_headers(ns.api_key), timeout=10)
    if r.status_code != 200:
        return _fail(r)
    if ns.json:
        print(r.text)
    else:
        print(status_table(r.json()))
    return 0


def health(ns) -> int:
    """GET /ready: 0 when a worker serves, 1 otherwise (one line saying which)."""
    try:
        r = httpx.get(f"{ns.url}/ready", timeout=ns.timeout)
        body = r.json() if r.headers.get("content-type", "").startswith("application/json") else {}
    except (httpx.HTTPError, ValueError) as e:
        print(f"{ns.url}: not serving ({type(e).__name__})", file=sys.stderr)
        return 1
    workers = f"{body.get('ready_workers', '?')} of {body.get('workers', '?')} worker(s) ready"
    if r.status_code == 200:
        print(f"{ns.url}: ready, {workers}")
        return 0
    print(f"{ns.url}: not ready (HTTP {r.status_code}), {workers}", file=sys.stderr)
    return 1


def scale(ns) -> int:
    if not ns.add and not ns.remove:
        print("nothing to do: give --add DEVICE and/or --remove ID", file=sys.stderr)
        return 2
    for device in ns.add:
        r = httpx.post(
            f"{ns.url}/v1/pool/workers", json={"device": device}, headers=_headers(ns.api_key)
        )
        if r.status_code != 201:
            return _fail(r)
        print(f"added worker {r.json()['id']} on {r.json()['device']}")
    for worker_id in ns.remove:
        r = httpx.request(  # a JSON body: worker actions refuse bodiless (browser) calls
            "DELETE", f"{ns.url}/v1/pool/workers/{worker_id}", json={}, headers=_headers(ns.api_key)
        )
        if r.status_code != 202:
            return _fail(r)
        print(
            f"worker {worker_id} is draining: its rows move to other workers as places"
            " free there (the rest, and a Ray replica's, finish on it), then it stops"
        )
    return 0


def run(ns) -> int:
    commands = {"synth": synth, "status": status, "scale": scale, "health": health}
    try:
        return commands[ns.command](ns)
    except ClientError as e:
        print(f"vibevoice-pool {ns.command}: {e}", file=sys.stderr)
        return 1
    except httpx.HTTPError as e:
        print(f"cannot reach {ns.url}: {e}", file=sys.stderr)
        return 1
