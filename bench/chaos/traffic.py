"""The chaos run's clients: requests of a fixed catalogue (script, voice, seed, format),
each answer's samples checked against the same request's answer on a quiet server.

    refs = references(url)                      # one answer a key, the server quiet
    Client(url, refs, rng).one(kind) -> dict    # one request, its outcome checked

Kinds: `speech` and `speech_stream` (/v1/audio/speech whole or streamed), `speech_sse`
(OpenAI's events: the audio, usage.audio_seconds and stop_reason checked), `synth` and
`synth_stream` (/v1/synthesize), `job` (POST /v1/jobs, followed to its end, its audio
fetched), `job_cancel` (a job cancelled by its client after a random moment) and
`leave` (a client that reads a stream's first bytes and hangs up). Every request has
a fixed seed; every wait is bounded (a request not answered in WAIT_S is `hung`).

Outcomes: `ok` (bit-equal), `ok_rounding` (within TOLERANCE_LSB of the reference
on every sample, the same length), `mismatch`, `error` (an HTTP error status, its
code kept), `quarantined` (worker_lost: it was running on two workers that died, which
the pool answers so by design), `hung`, `broken` (a transport error: the connection
dropped; a stream the pool ends with an error ends so), `cancelled` and `left` (as
meant; what they got is checked as a prefix of the reference).
"""

from __future__ import annotations

import base64
import json
import random
import time

import httpx
import numpy as np

SCRIPTS = {  # /v1/synthesize and jobs: one speaker and two
    "one": "Speaker 1: A fixed line for the chaos run, said the same every time.",
    "two": "Speaker 1: One line under fire.\nSpeaker 2: And a second one, all the same.",
}
SPEECH_INPUT = "Every answer is checked against a quiet server's answer."
VOICES = ("demo-Alice_woman", "demo-Bob_man")  # the demo presets
SEEDS = (11, 12)
FORMATS = ("pcm", "wav")
STEPS = 4
SAMPLE_RATE = 24_000
WAIT_S = 180.0  # the longest any one request may take before it counts as hung
# A request's audio depends on its seed alone, to float rounding: a batch of
# another size, or a row resumed from its history, sums in another order (docs/MODEL.md:
# about 5e-7 of the peak on the tiny model), which moves a 16-bit sample by at most one
# step when it sits on a rounding edge. Anything more is a wrong answer.
TOLERANCE_LSB = 1
KINDS = ("speech", "speech_stream", "speech_sse", "synth", "synth_stream", "job")
KINDS += ("job_cancel", "leave")
WEIGHTS = (2, 2, 1, 2, 2, 2, 1, 1)


def keys() -> list[tuple]:
    """Every (route, script, voice, seed, format) the run sends."""
    out = [("speech", "input", v, s, f) for v in VOICES for s in SEEDS for f in FORMATS]
    out += [("synth", n, v, s, f) for n in SCRIPTS for v in VOICES for s in SEEDS for f in FORMATS]
    return out


def body(key: tuple, stream: bool) -> dict:
    route, script, voice, seed, fmt = key
    if route == "speech":
        return {
            "model": "tts-1",
            "input": SPEECH_INPUT,
            "voice": voice,
            "response_format": fmt,
            "seed": seed,
            "inference_steps": STEPS,
            "stream": stream,
        }
    other = VOICES[1 - VOICES.index(voice)]
    speakers = [{"voice": voice}] + ([{"voice": other}] if script == "two" else [])
    b = {"script": SCRIPTS[script], "speakers": speakers, "seed": seed, "format": fmt}
    return b | {"inference_steps": STEPS, "stream": stream}


def samples(data: bytes, fmt: str) -> np.ndarray:
    """16-bit samples of an answer: raw pcm, or a WAV's data chunk (a streamed WAV
    does not know its length: its data runs to the end)."""
    if fmt == "wav":
        at = data.find(b"data", 12)
        if data[:4] != b"RIFF" or at < 0:
            raise ValueError("not a WAV")
        data = data[at + 8 :]
    return np.frombuffer(data[: len(data) // 2 * 2], dtype="<i2")


def compare(ref: np.ndarray, got: np.ndarray, prefix: bool = False) -> tuple[str, str]:
    """`got` against the reference (with `prefix`, against as much of it as `got` holds:
    what a cancelled job made, what a client read before it left)."""
    if len(got) != len(ref) and not (prefix and len(got) <= len(ref)):
        return "mismatch", f"{len(got)} samples, the reference {len(ref)}"
    ref = ref[: len(got)]
    if np.array_equal(ref, got):
        return "ok", ""
    worst = int(np.max(np.abs(ref.astype(np.int32) - got.astype(np.int32))))
    off = int(np.count_nonzero(ref != got))
    if worst <= TOLERANCE_LSB:
        return "ok_rounding", f"{off} samples off by {worst}"
    return "mismatch", f"{off} samples off, worst by {worst} (peak {int(np.abs(ref).max())})"


def error_outcome(data: bytes | str) -> str:
    """`quarantined` for the pool's answer to a request that was running on two workers
    that died (worker_lost, by design: docs/OPERATIONS.md), else `error`."""
    return "quarantined" if "worker_lost" in str(data) else "error"


def path_of(key: tuple) -> str:
    return "/v1/audio/speech" if key[0] == "speech" else "/v1/synthesize"


class Reference(np.ndarray):
    """A key's samples, and why its row stopped (X-Stop-Reason)."""

    stop_reason: str = ""


def references(url: str) -> dict[tuple, Reference]:
    """Each key's answer, whole, one at a time: the server is quiet."""
    out = {}
    with httpx.Client(base_url=url, timeout=WAIT_S) as c:
        for key in keys():
            r = c.post(path_of(key), json=body(key, stream=False))
            r.raise_for_status()
            out[key] = samples(r.content, key[4]).view(Reference)
            out[key].stop_reason = r.headers.get("x-stop-reason", "")
    return out


def headers_wrong(ref: Reference, got: np.ndarray, r: httpx.Response) -> str:
    """What a whole answer's headers say against its samples and the reference: its
    length (X-Audio-Seconds) and why it stopped (X-Stop-Reason); "" when right."""
    said = r.headers.get("x-audio-seconds")
    if said is not None and abs(float(said) - len(got) / SAMPLE_RATE) > 0.0006:
        return f"X-Audio-Seconds {said} for {len(got)} samples"
    stop = r.headers.get("x-stop-reason")
    if stop is not None and stop != ref.stop_reason:
        return f"X-Stop-Reason {stop}, the reference's {ref.stop_reason}"
    return ""


class Client:
    """One client thread's requests, drawn from its own seeded generator."""

    def __init__(self, url: str, refs: dict, rng: random.Random):
        self.url, self.refs, self.rng = url, refs, rng

    def one(self, kind: str) -> dict:
        key = self.rng.choice(
            [k for k in self.refs if (k[0] == "speech") == kind.startswith("speech")]
        )
        if kind.startswith("job"):
            key = self.rng.choice([k for k in self.refs if k[0] == "synth"])
        row = {"kind": kind, "key": list(key), "t": time.time()}
        t0 = time.monotonic()
        try:
            row |= getattr(self, "_" + kind)(key)
        except httpx.TimeoutException as e:
            row |= {"outcome": "hung", "detail": type(e).__name__}
        except httpx.TransportError as e:
            row |= {"outcome": "broken", "detail": f"{type(e).__name__}: {e}"[:200]}
        row["wait_s"] = round(time.monotonic() - t0, 3)
        return row

    def _client(self) -> httpx.Client:
        # one bound for the whole answer: a read that stalls for WAIT_S is a hang
        return httpx.Client(base_url=self.url, timeout=httpx.Timeout(WAIT_S, connect=10))

    def _check(self, key: tuple, r: httpx.Response, data: bytes, meant: str = "") -> dict:
        """The answer's outcome; `meant` (cancelled, left): the answer is a prefix, and
        that outcome when it matches."""
        if r.status_code != 200:
            return {"outcome": error_outcome(data), "detail": f"{r.status_code} {data[:160]!r}"}
        try:
            got = samples(data, key[4])
        except ValueError as e:
            return {"outcome": "mismatch", "detail": str(e)}
        outcome, detail = compare(self.refs[key], got, prefix=bool(meant))
        wrong = "" if meant else headers_wrong(self.refs[key], got, r)
        if wrong and outcome != "mismatch":
            outcome, detail = "mismatch", wrong
        if meant and outcome != "mismatch":
            outcome, detail = meant, f"{len(got)} samples, {outcome} {detail}".strip()
        return {"outcome": outcome, "detail": detail, "request_id": r.headers.get("x-request-id")}

    def _whole(self, key: tuple) -> dict:
        with self._client() as c:
            r = c.post(path_of(key), json=body(key, stream=False))
            return self._check(key, r, r.content)

    def _streamed(self, key: tuple) -> dict:
        deadline = time.monotonic() + WAIT_S
        with self._client() as c, c.stream("POST", path_of(key), json=body(key, True)) as r:
            rid, parts = r.headers.get("x-request-id"), []
            try:
                for part in r.iter_bytes():
                    parts.append(part)
                    if time.monotonic() > deadline:
                        return {"outcome": "hung", "detail": f"{sum(map(len, parts))} B in"}
            except httpx.TransportError as e:  # the stream ended without its last chunk
                detail = f"{type(e).__name__} after {sum(map(len, parts))} B"
                return {"outcome": "broken", "detail": detail, "request_id": rid}
            return self._check(key, r, b"".join(parts))

    _speech = _synth = _whole
    _speech_stream = _synth_stream = _streamed

    def _speech_sse(self, key: tuple) -> dict:
        """OpenAI's events: the deltas' audio, and the done event's seconds and stop
        reason, against the reference."""
        b = body(key, True) | {"stream_format": "sse"}
        with self._client() as c, c.stream("POST", "/v1/audio/speech", json=b) as r:
            rid, data, done = r.headers.get("x-request-id"), b"", None
            if r.status_code != 200:
                r.read()
                return self._check(key, r, r.content)
            try:
                for line in r.iter_lines():
                    if not line.startswith("data: "):
                        continue
                    event = json.loads(line[6:])
                    if event["type"] == "speech.audio.delta":
                        data += base64.b64decode(event["audio"])
                    elif event["type"] == "speech.audio.done":
                        done = event
                    else:
                        out = error_outcome(json.dumps(event))
                        return {"outcome": out, "detail": str(event)[:200], "request_id": rid}
            except httpx.TransportError as e:
                detail = f"{type(e).__name__} after {len(data)} B"
                return {"outcome": "broken", "detail": detail, "request_id": rid}
        row = self._check(key, r, data) | {"request_id": rid}
        if done is None:
            return row | {"outcome": "broken", "detail": "no speech.audio.done"}
        n = len(samples(data, key[4]))
        said = done["usage"]["audio_seconds"]
        if row["outcome"] != "mismatch" and abs(said - n / SAMPLE_RATE) > 0.0006:
            row |= {"outcome": "mismatch", "detail": f"usage.audio_seconds {said} for {n} samples"}
        if row["outcome"] != "mismatch" and done["stop_reason"] != self.refs[key].stop_reason:
            detail = f"stop_reason {done['stop_reason']}, the reference's "
            row |= {"outcome": "mismatch", "detail": detail + self.refs[key].stop_reason}
        return row

    def _leave(self, key: tuple) -> dict:
        """Read a stream's first bytes (checked as a prefix) and hang up."""
        with self._client() as c, c.stream("POST", path_of(key), json=body(key, True)) as r:
            first = b""
            for part in r.iter_bytes():
                first += part
                if len(first) >= 4096:
                    break  # leaving the with block closes the connection mid-stream
            if key[4] == "wav" and len(first) < 44:
                return {"outcome": "left", "detail": f"{len(first)} B"}
            return self._check(key, r, first, meant="left")

    def _job(self, key: tuple, cancel_after: float | None = None) -> dict:
        with self._client() as c:
            r = c.post("/v1/jobs", json=body(key, stream=False))
            if r.status_code != 202:
                return {"outcome": "error", "detail": f"{r.status_code} {r.text[:160]!r}"}
            job = r.json()["id"]
            auth = {"X-Owner-Token": r.headers.get("X-Owner-Token", "")}
            c.cookies.clear()
            if cancel_after is not None:
                time.sleep(cancel_after)
                r = c.post(f"/v1/jobs/{job}/cancel", headers=auth)
                if r.status_code != 200:
                    return {
                        "outcome": "error",
                        "detail": f"cancel {r.status_code} {r.text[:120]!r}",
                    }
            state, deadline = "", time.monotonic() + WAIT_S
            while time.monotonic() < deadline:
                view = c.get(f"/v1/jobs/{job}", headers=auth).json()
                state = view["state"]
                if state in ("done", "failed", "cancelled"):
                    break
                time.sleep(0.25)
            else:
                return {"outcome": "hung", "detail": f"job {job} still {state}", "job": job}
            out = {"job": job}
            if state == "done":
                r = c.get(f"/v1/jobs/{job}/audio", headers=auth)
                out |= self._check(key, r, r.content)
            elif state == "cancelled" and cancel_after is not None:
                r = c.get(f"/v1/jobs/{job}/audio", headers=auth)  # the audio it made
                if r.status_code == 200:
                    out |= self._check(key, r, r.content, meant="cancelled")
                else:  # none made yet: 410
                    out |= {"outcome": "cancelled", "detail": f"audio {r.status_code}"}
            else:
                detail = f"job {state}: {view.get('error')}"[:200]
                rid = view.get("request_id")
                out |= {"outcome": error_outcome(detail), "detail": detail, "request_id": rid}
            c.delete(f"/v1/jobs/{job}", headers=auth)
            return out

    def _job_cancel(self, key: tuple) -> dict:
        return self._job(key, cancel_after=self.rng.uniform(0.0, 1.5))
