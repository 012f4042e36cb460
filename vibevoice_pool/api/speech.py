"""One request model for every front end: what a speech request is and how it is answered.

The native route (/v1/synthesize), the OpenAI route, the jobs (HTTP and the
page's tab) and the page itself all build their pool Request here:

    SynthesizeBody, Speaker         the body (pydantic): script, speakers, format...
    Front                           what every front end holds: pool, voices, settings;
                                    Front.build_request(body) -> Request (BAD_INPUT
                                    otherwise)
    describe_invalid(errors)        one message for pydantic's validation errors
    run_to_response / stream_response / headers_for
                                    answer a RequestHandle whole or as it is made

No route is declared here, so a front end that imports this imports no other
front end.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
from dataclasses import dataclass, field
from typing import Annotated, Protocol

from fastapi import Request
from fastapi.responses import Response, StreamingResponse
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field

from vibevoice_pool import audio, encoders
from vibevoice_pool.api import tempo, whole
from vibevoice_pool.api.auth import Keys
from vibevoice_pool.api.errors import error_code, error_response, status_for
from vibevoice_pool.api.metrics import Activity
from vibevoice_pool.audio import BASE64_PATTERN as BASE64
from vibevoice_pool.config import PoolConfig
from vibevoice_pool.pool.facade import Pool
from vibevoice_pool.pool.handle import RequestHandle
from vibevoice_pool.script import MAX_SPEAKERS, check_encodable, parse_script
from vibevoice_pool.voices.library import VoiceLibrary
from workers.wire import messages as m

log = logging.getLogger("vibevoice_pool")

JSON = "application/json"
INLINE_FORMATS = ("wav", "pcm")
INLINE_ENCODE_SAMPLES = 60 * 24_000  # up to a minute of audio is encoded on the loop
DISCONNECT_CHECK_S = 0.5  # how often a request answered whole looks for its client
STREAM_HEADERS = {"X-Accel-Buffering": "no"}  # a proxy (nginx) passes each piece on at once


# A text field must hold something besides spaces. One class that means the same in
# JSON Schema's (ECMA) regexes, pydantic's and Python's: what str.strip() removes
# (\x1c-\x1f and \x85 too) and the byte-order mark (whitespace to ECMA).
NOT_BLANK = r"[^\s\x1c-\x1f\x85\ufeff]"
# A voice sample in a body: base64 (audio.base64_bytes), declared with its pattern but
# not enforced by it, so that the server's own check says what is wrong.
Base64Audio = Annotated[
    str,
    Field(min_length=1, json_schema_extra={"contentEncoding": "base64", "pattern": BASE64}),
]
# A speaker gives a voice or a sample, not both (build_request says so with 400)
NOT_BOTH = {
    "not": {
        "required": ["voice", "audio"],
        "properties": {"voice": {"type": "string"}, "audio": {"type": "string"}},
    }
}


def _whole(value):
    """A JSON number without a fraction is an integer (JSON Schema says so): 5.0 is 5.
    Anything else goes on to the strict check (true, "5" and 5.5 are refused)."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


# Integer fields: strict but for whole floats (5.0), then their limits
Steps = Annotated[int, Field(strict=True, ge=1, le=m.MAX_INFERENCE_STEPS), BeforeValidator(_whole)]
Seed = Annotated[int, Field(strict=True, ge=0, lt=2**31), BeforeValidator(_whole)]


class Speaker(BaseModel):
    model_config = ConfigDict(extra="forbid", json_schema_extra=NOT_BOTH)
    voice: str | None = Field(
        None, min_length=1, pattern=NOT_BLANK, description="name of a voice (see /v1/voices)"
    )
    audio: Base64Audio | None = Field(None, description="base64 of a wav/mp3/flac/ogg voice sample")


class SynthesizeBody(BaseModel):
    """Numbers and flags are strict: `true` is not 1, "1" is not a number (5.0 is 5)."""

    model_config = ConfigDict(extra="forbid")
    script: str = Field(
        ..., pattern=NOT_BLANK, description="'Speaker 1: ...' lines; speakers 1-4 (or 0-3)"
    )
    speakers: list[Speaker] = Field(default_factory=list, max_length=MAX_SPEAKERS)
    cfg_scale: float = Field(1.3, ge=m.MIN_CFG_SCALE, le=m.MAX_CFG_SCALE, strict=True)
    inference_steps: Steps | None = None
    seed: Seed | None = None
    format: str = Field("wav", json_schema_extra={"enum": list(encoders.SUPPORTED_FORMATS)})
    stream: bool = Field(False, strict=True)
    max_audio_s: float | None = Field(None, gt=0, strict=True)


class StreamTokens(Protocol):
    """The page's live audio streams (ui/live.LiveStreams), as the API's key check
    sees them: a path it lets through without a key."""

    def allows(self, path: str) -> bool: ...


@dataclass
class Front:
    """What every route needs: the pool, the voices, the settings, and the services
    launch adds (each None until then)."""

    pool: Pool
    voices: VoiceLibrary
    cfg: PoolConfig  # cfg.api_key is the resolved key (auth.resolve_api_key)
    activity: Activity | None = None  # made by create_app when not given
    cors_origins: tuple[str, ...] = ()  # none: no CORS headers at all
    stream_tokens: StreamTokens | None = field(default=None, repr=False)
    # the JobRunner (jobs/runner.py, which imports this module: so not named here)
    jobs: object | None = None
    # --api-key and --api-keys, set at launch (a LiveKeys with a keys file: it reads
    # the file again when it changes)
    keys: Keys | None = None
    jobs_unavailable: str = ""  # why there are no jobs (a full data disk at start)

    def refused(self, err: m.PoolError) -> None:
        """Count an error answered before admission (for /metrics)."""
        if self.activity is not None:
            status = status_for(err)  # a 429 by its code: overloaded, owner_queue_full
            self.activity.refused(error_code(err) if status in (413, 429) else err.kind.value)

    @property
    def max_body_bytes(self) -> int:
        """The largest /v1 request body: four base64 voice samples and a full script."""
        per_voice = math.ceil(self.cfg.max_upload_bytes / 3) * 4 + 1024
        return MAX_SPEAKERS * per_voice + 6 * self.cfg.max_text_chars + (1 << 20)

    def build_request(self, body: SynthesizeBody) -> m.Request:
        """A validated Request (BAD_INPUT otherwise). Decodes uploads: call off the loop."""
        encoders.check_format(body.format)
        turns = parse_script(
            body.script,
            max_chars=self.cfg.max_text_chars,
            num_speakers=len(body.speakers) or None,
        )
        n = max(t.speaker for t in turns) + 1
        # a speaker the body leaves out speaks with a preset, never another caller's upload
        presets = self.voices.presets()
        voices = []
        for i in range(max(n, len(body.speakers))):
            sp = body.speakers[i] if i < len(body.speakers) else Speaker()
            if sp.voice is not None and sp.audio is not None:
                raise m.PoolError(
                    m.ErrorKind.BAD_INPUT, f"speakers[{i}]: give voice or audio, not both"
                )
            if sp.audio is not None:  # "" is refused as empty, not taken as no voice
                voices.append(
                    audio.decode_base64_upload(
                        sp.audio,
                        max_bytes=self.cfg.max_upload_bytes,
                        max_seconds=self.cfg.max_voice_s,
                        what=f"speakers[{i}].audio",
                    )
                )
            elif sp.voice is not None:
                # a speaker the script does not use is still checked, not ignored
                voices.append(
                    self.voices.resolve(sp.voice) if i < n else self.voices.match(sp.voice)
                )
            else:
                voices.append(self.voices.resolve(presets[i % len(presets)]) if presets else None)
        voices = voices[:n]
        return self.pool.make_request(
            turns,
            voices,
            cfg_scale=body.cfg_scale,
            inference_steps=body.inference_steps,
            seed=body.seed,
            stream=body.stream,
            max_audio_s=body.max_audio_s,
        )


def headers_for(handle: RequestHandle, audio_s: float | None = None) -> dict:
    h = {"X-Request-Id": handle.id, "X-Seed": str(handle.seed)}
    if handle.worker is not None:
        h["X-Worker"] = str(handle.worker)
    if audio_s is not None:
        h["X-Audio-Seconds"] = f"{audio_s:.3f}"
    if isinstance(handle.outcome, m.Done):  # why it stopped: eos, runaway_cap, max_audio...
        h["X-Stop-Reason"] = handle.outcome.stop_reason
    return h


async def _cancel_on_disconnect(request: Request, handle: RequestHandle) -> None:
    while not handle.done:
        if await request.is_disconnected():
            log.info("request %s: the client went away; cancelling", handle.id)
            handle.cancel()
            return
        await asyncio.sleep(DISCONNECT_CHECK_S)


async def started(request: Request, handle: RequestHandle) -> None:
    """Wait until a worker begins the request (raises the PoolError it failed with
    before that), cancelling it if its client leaves meanwhile: a streamed answer's
    body watches its client only once it runs, and a request that waits in the queue
    for a client that is gone would hold its place there, then run for nobody."""
    watcher = asyncio.create_task(_cancel_on_disconnect(request, handle))
    try:
        await handle.started()
    finally:
        watcher.cancel()


async def run_to_response(
    request: Request, handle: RequestHandle, fmt: str, speed: float = 1.0
) -> Response:
    """Wait for the whole result, then answer it encoded as `fmt`, at `speed` times its
    pace (tempo.py; X-Audio-Seconds tells the length sent). The client is looked
    for every DISCONNECT_CHECK_S from then on (by a task started after the first wait:
    none for a request answered sooner), and a request whose client left is cancelled."""
    watcher: list[asyncio.Task] = []

    def watch() -> None:
        watcher.append(asyncio.create_task(_cancel_on_disconnect(request, handle)))

    timer = asyncio.get_running_loop().call_later(DISCONNECT_CHECK_S, watch)
    kept = whole.AnswerAudio()  # past a minute in a temporary file (whole.py)
    try:
        async for pcm in handle.stream(release=True):  # the handle lets each chunk go
            kept.add(pcm)
    except m.PoolError as e:
        kept.close()
        return error_response(e)
    finally:
        timer.cancel()
        for task in watcher:
            task.cancel()
    if speed == 1.0 and fmt in INLINE_FORMATS and kept.made <= INLINE_ENCODE_SAMPLES:
        body, size, samples, ctype = whole.encoded(kept, fmt)  # cheaper than a thread hop
    else:
        body, size, samples, ctype = await asyncio.to_thread(whole.encoded, kept, fmt, speed)
    headers = headers_for(handle, samples / m.SAMPLE_RATE)
    if isinstance(body, bytes):
        return Response(body, media_type=ctype, headers=headers)
    headers["Content-Length"] = str(size)
    return StreamingResponse(whole.file_chunks(body), media_type=ctype, headers=headers)


def stream_encoder(fmt: str, speed: float = 1.0):
    """The encoder of a streamed answer: `fmt`, its input stretched unless speed is 1."""
    enc = encoders.StreamEncoder(fmt)
    return enc if speed == 1.0 else tempo.StretchedEncoder(enc, speed)


async def encoded(handle: RequestHandle, enc: encoders.StreamEncoder):
    """The handle's audio through `enc` as it is made: the header, each chunk's bytes,
    the tail. Raises the PoolError the request failed with; the encoder is closed, and
    a request still running when its reader stops (the client went away) is cancelled.
    The handle lets go of each chunk once it is read (its one reader: the client's)."""
    try:
        yield await encoders.run(enc, enc.start)
        async for pcm in handle.stream(release=True):
            data = await encoders.run(enc, enc.push, pcm)
            if data:
                yield data
        yield await encoders.run(enc, enc.end)
    finally:
        enc.close()
        if not handle.done:
            handle.cancel()


async def stream_response(
    request: Request, handle: RequestHandle, fmt: str, speed: float = 1.0
) -> Response:
    """Stream audio as the worker makes it (at `speed` times its pace: each chunk is
    stretched as it comes). Waits for Started so X-Worker is known."""
    try:
        await started(request, handle)
    except m.PoolError as e:
        return error_response(e)
    enc = stream_encoder(fmt, speed)

    async def body():
        try:
            async with contextlib.aclosing(encoded(handle, enc)) as pieces:
                async for data in pieces:
                    yield data
        except m.PoolError as e:
            log.warning(
                "stream %s failed after its headers (%s: %s): the connection closes "
                "without the body's end",
                handle.id,
                e.kind.value,
                e.message,
            )
            raise CutShort from e

    headers = headers_for(handle) | STREAM_HEADERS
    return CutStream(body(), media_type=enc.content_type, headers=headers)


class WatchedStream(StreamingResponse):
    """A StreamingResponse that watches its client with plain asyncio tasks instead of
    starlette's anyio task group. When the client leaves, the stream is cancelled, and
    its CancelledError carries the frames of every reader of the request: its handle,
    and all the audio that holds. anyio's task group keeps that error in a reference
    cycle (its task_done callback's frame holds it, and is on its traceback), so the
    audio of every stream whose client left stayed in memory until the next full
    garbage collection: on an idle server, never."""

    async def __call__(self, scope, receive, send) -> None:
        spec = tuple(map(int, scope.get("asgi", {}).get("spec_version", "2.0").split(".")))
        if spec >= (2, 4):  # the server tells a gone client by failing send: no watcher
            return await super().__call__(scope, receive, send)
        stream = asyncio.ensure_future(self.stream_response(send))
        gone = asyncio.ensure_future(self.listen_for_disconnect(receive))
        try:
            await asyncio.wait((stream, gone), return_when=asyncio.FIRST_COMPLETED)
        finally:
            stream.cancel()
            gone.cancel()
            await asyncio.wait((stream, gone))
        if not gone.cancelled():
            gone.result()  # (an error of `receive`, if any)
        if not stream.cancelled():
            stream.result()  # the stream's own error, if any
        if self.background is not None:
            await self.background()


class CutShort(Exception):
    """A streamed answer's request failed after its status and headers were sent."""


class CutStream(WatchedStream):
    """A stream that, when its request fails after the headers (CutShort), ends
    without the body's last chunk: the connection closes, and an HTTP client sees an
    incomplete body (curl exits 18, httpx raises RemoteProtocolError). A clean end
    would hand the client a cut file as if it were whole: a chunked body has no
    length to compare against."""

    async def stream_response(self, send) -> None:
        try:
            await super().stream_response(send)
        except CutShort:
            _CUTS.expect()  # uvicorn says the answer did not complete: that is the point


class _ExpectedCuts(logging.Filter):
    """Drops uvicorn's error line for an answer CutStream left open on purpose (its
    own warning has said why); any other unfinished answer is still logged."""

    MESSAGE = "ASGI callable returned without completing response."

    def __init__(self):
        super().__init__()
        self.pending = 0

    def expect(self) -> None:
        self.pending += 1

    def filter(self, record: logging.LogRecord) -> bool:
        if self.pending and record.getMessage() == self.MESSAGE:
            self.pending -= 1
            return False
        return True


_CUTS = _ExpectedCuts()
logging.getLogger("uvicorn.error").addFilter(_CUTS)


def _short(value, limit: int = 60) -> str:
    text = repr(value[:limit] if isinstance(value, (str, bytes)) else value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _union_tag(part) -> bool:
    """A part of a location that names a branch of a union (constrained-str, VoiceId,
    function-after[...]), not a field: the bodies' fields are lower-case names."""
    return isinstance(part, str) and (part[:1].isupper() or "-" in part or "[" in part)


def _where(loc) -> str:
    """pydantic's location as a reader writes it: speakers[0].audio."""
    out = ""
    for part in loc:
        if part == "body" or _union_tag(part):
            continue
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "body"


def _one_branch(errors) -> list:
    """A value that fits no branch of a union gets an error from each: keep those of
    the branch of its own kind (a string's from the string branch), one field once."""
    by_field: dict[str, list] = {}
    for e in errors:
        by_field.setdefault(_where(e.get("loc", ())), []).append(e)
    out = []
    for group in by_field.values():
        if len(group) > 1 and any(any(map(_union_tag, e.get("loc", ()))) for e in group):
            mine = [
                e
                for e in group
                if isinstance(e.get("input"), str) == e.get("type", "").startswith("string_")
            ]
            group = mine or group
        out += group
    return out


# a body each JSON route takes, for the message that says what to send instead
EXAMPLE_BODIES = {
    "/v1/audio/speech": '{"model": "tts-1", "input": "Hello", "voice": "alloy"}',
    "/v1/pool/workers": '{"device": "cuda:0"}',
}
EXAMPLE_BODY = '{"script": "Speaker 1: Hello"}'


def describe_invalid(errors, path: str = "", content_type: str | None = None) -> str:
    """One message for pydantic's validation errors, saying what to fix; `path` picks
    the example body it shows, and a body sent as another content type is told so."""
    example = EXAMPLE_BODIES.get(path, EXAMPLE_BODY)
    ctype = (content_type or "").split(";")[0].strip().lower()
    parts = []
    for e in _one_branch(errors):
        where = _where(e.get("loc", ()))
        kind = e.get("type", "")
        if kind == "json_invalid":
            why = (e.get("ctx") or {}).get("error", "")
            parts.append(
                f"the body is not valid JSON ({why}); send a JSON object such as {example}"
            )
        elif kind == "missing":
            parts.append(f"{where}: required, but missing")
        elif kind == "extra_forbidden":
            parts.append(f"{where}: unknown field; remove it (see /docs for the fields)")
        elif kind == "string_pattern_mismatch" and (e.get("ctx") or {}).get("pattern") == NOT_BLANK:
            parts.append(f"{where} is empty: write some text")
        elif kind == "string_unicode" and isinstance(e.get("input"), str):
            try:  # the pattern check met a lone surrogate: say so as the script check does
                check_encodable(e["input"], where)
            except m.PoolError as err:
                parts.append(err.message)
            else:
                parts.append(f"{where}: {e.get('msg')}")
        elif kind == "string_too_short" and not e.get("input"):
            parts.append(f"{where} is empty: leave it out or give a value")
        elif kind == "model_attributes_type" and where == "body" and ctype not in ("", JSON):
            parts.append(
                f"the body was sent as {ctype!r}: send it as JSON, with Content-Type: "
                f"{JSON} (a JSON object such as {example})"
            )
        elif kind == "model_attributes_type" and where == "body":
            parts.append(f"the body must be a JSON object such as {example}")
        else:
            parts.append(f"{where}: {e.get('msg')} (got {_short(e.get('input'))})")
    return "; ".join(parts) or "invalid request"
