"""POST /v1/audio/speech, compatible with OpenAI's text-to-speech API.

    {"model": "...", "input": "text", "voice": "<preset>", "response_format":
     "mp3|opus|aac|flac|wav|pcm", "speed": 1.0, "stream_format": "audio|sse"}

- `model` is any non-empty name (this server has one model); echoed in X-Model.
- `voice` is a voice of /v1/voices. OpenAI's own voice names (alloy, echo,
  ...) map to presets only, never to an upload: as the `openai_voices`
  setting declares (alloy=NAME,...), else a preset of that name, else the
  presets in a fixed order (VoiceLibrary.openai_voice), so programs written
  for OpenAI run unchanged; X-Voice says which preset was used.
- `input` is one speaker's text; "Speaker N:" lines still work as in
  /v1/synthesize, with the other speakers on the default presets.
- The audio is streamed as it is made, as OpenAI's API does: every format
  plays while it arrives (encoders.py). `"stream": false` answers one whole
  file instead, with X-Audio-Seconds; flac is whole unless `"stream": true`
  (a streamed FLAC cannot say its length, and libsndfile will not read it).
  `"stream_format": "sse"` sends OpenAI's events: speech.audio.delta with
  base64 audio (flac: one whole file's pieces once it is made, unless
  `"stream": true`), then speech.audio.done with OpenAI's usage (input_tokens,
  output_tokens, total_tokens; and audio_seconds) and stop_reason.
- `speed` (0.25-4.0, OpenAI's range) plays the audio that many times faster, its
  pitch kept (tempo.py): every format, whole or streamed (each chunk is stretched
  as it comes), with X-Audio-Seconds and usage.audio_seconds telling the length
  sent; the model makes the same audio at every speed (the same seed, the same
  words), and usage's output tokens count what it made.
- Extensions: seed, cfg_scale, inference_steps, stream.

What clients list before they speak (Open WebUI, SillyTavern, Kokoro-FastAPI's
shapes):
    GET /v1/models          {"object": "list", "data": [{"id", "object": "model",
                             "created", "owned_by"}]}  (OpenAI's; tts-1 and the
                             other names clients send are all this one model)
    GET /v1/models/{id}     one of those, or 404
    GET /v1/audio/models    {"models": [{"id", "name"}]}  (Open WebUI)
    GET /v1/audio/voices    {"voices": [{"id", "name"}]}  the presets (Open WebUI,
                             Kokoro-FastAPI); ?names=true: {"voices": ["name", ...]}
Errors are OpenAI-shaped (errors.py), as on every route.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import math
import time
from typing import Annotated, Literal
from urllib.parse import quote

from fastapi import APIRouter, Request
from pydantic import BaseModel, ConfigDict, Field

from vibevoice_pool import encoders
from vibevoice_pool.api import tempo
from vibevoice_pool.api import whole as answers
from vibevoice_pool.api.auth import tenant_of
from vibevoice_pool.api.errors import error_response, plain_error
from vibevoice_pool.api.speech import (
    NOT_BLANK,
    STREAM_HEADERS,
    Seed,
    Speaker,
    Steps,
    SynthesizeBody,
    WatchedStream,
    encoded,
    headers_for,
    run_to_response,
    started,
    stream_encoder,
    stream_response,
)
from vibevoice_pool.voices.library import MODEL_VOICE, OPENAI_VOICES
from workers.wire import messages as m

# Names clients send as `model`; every one is this server's single model.
MODEL_IDS = ("vibevoice", "tts-1", "tts-1-hd", "gpt-4o-mini-tts")
OWNER = "vibevoice-pool"
DEFAULT_FORMAT, DEFAULT_CFG = "mp3", 1.3  # what null or an absent field means
SSE_PIECE = 48 * 1024  # bytes of a whole file's audio in one speech.audio.delta
AUDIO_TOKENS_PER_S = 7.5  # VibeVoice's acoustic tokenizer: one token per 3200 samples


class VoiceId(BaseModel):
    id: str = Field(..., min_length=1, pattern=NOT_BLANK)


class SpeechBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: str = Field(
        ..., min_length=1, max_length=256, description="any name; this server has one model"
    )
    input: str = Field(..., pattern=NOT_BLANK, description="the text to speak")
    voice: Annotated[str, Field(min_length=1, pattern=NOT_BLANK)] | VoiceId = Field(
        ..., description="a voice of /v1/voices (or an OpenAI name)"
    )
    instructions: str | None = Field(None, description="accepted; VibeVoice takes no style prompt")
    # null is unset for every optional field, as OpenAI's API reads it
    response_format: str | None = Field(
        DEFAULT_FORMAT, json_schema_extra={"enum": [*encoders.SUPPORTED_FORMATS, None]}
    )
    speed: float | None = Field(
        1.0,
        ge=tempo.MIN_SPEED,
        le=tempo.MAX_SPEED,
        strict=True,
        description="how fast the audio plays, pitch kept (1.0: as made)",
    )
    stream_format: Literal["audio", "sse"] | None = "audio"
    stream: bool | None = Field(
        None, strict=True, description="stream while it is made (default: yes, but flac whole)"
    )
    seed: Seed | None = None
    cfg_scale: float | None = Field(
        DEFAULT_CFG, ge=m.MIN_CFG_SCALE, le=m.MAX_CFG_SCALE, strict=True
    )
    inference_steps: Steps | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"]
    created: int
    owned_by: str


class ModelList(BaseModel):
    object: Literal["list"]
    data: list[ModelCard]


class Named(BaseModel):
    id: str
    name: str


class AudioModels(BaseModel):
    models: list[Named]


class AudioVoices(BaseModel):
    voices: list[Named] | list[str]


def parse_openai_map(text: str) -> dict[str, str]:
    """The openai_voices setting ("alloy=NAME,echo=NAME") as {openai name: preset}.
    ValueError naming the mistake."""
    out: dict[str, str] = {}
    for part in (text or "").split(","):
        if not part.strip():
            continue
        name, sep, preset = part.partition("=")
        name, preset = name.strip().lower(), preset.strip()
        if not sep or not preset:
            raise ValueError(f"write NAME=PRESET pairs separated by commas, not {part.strip()!r}")
        if name not in OPENAI_VOICES:
            raise ValueError(f"{name!r} is not an OpenAI voice name ({', '.join(OPENAI_VOICES)})")
        out[name] = preset
    return out


def _bad(message: str) -> m.PoolError:
    return m.PoolError(m.ErrorKind.BAD_INPUT, message)


def resolve_voice(library, voice: str, declared: dict[str, str] | None = None) -> str | None:
    """The preset a requested voice means (see the module docstring); None for an OpenAI
    voice name when there are no presets: the model speaks in its own voice."""
    if voice.strip().lower() in OPENAI_VOICES:
        return library.openai_voice(voice, declared)
    return library.match(voice)


def check(body: SpeechBody, max_chars: int) -> str:
    """What the body's own fields cannot say; the format it asks for."""
    if not body.input.strip():
        raise _bad("input is empty; give the text to speak")
    if len(body.input) > max_chars:
        raise _bad(
            f"input has {len(body.input)} characters; the limit is {max_chars}. "
            "Split the text into several requests"
        )
    return encoders.check_format(body.response_format or DEFAULT_FORMAT)


def streams(body: SpeechBody, fmt: str) -> bool:
    """Whether the audio goes out as it is made (see the module docstring)."""
    if body.stream_format == "sse":
        return True
    return body.stream if body.stream is not None else fmt != "flac"


async def _whole(handle, fmt: str, speed: float):
    """The audio as one file once it is all made, at `speed`, in pieces of SSE_PIECE
    bytes (a streamed FLAC cannot say its length, and libsndfile will not read it); past
    a minute its audio waits in a temporary file (whole.py)."""
    kept = answers.AnswerAudio()
    try:
        async for pcm in handle.stream(release=True):
            kept.add(pcm)
    except BaseException:  # it failed, or the client went away
        kept.close()
        raise
    finally:
        if not handle.done:
            handle.cancel()  # the client went away
    body, size, _, _ = await asyncio.to_thread(answers.encoded, kept, fmt, speed)
    if isinstance(body, bytes):
        for i in range(0, len(body), SSE_PIECE):
            yield body[i : i + SSE_PIECE]
        return
    try:
        while data := await asyncio.to_thread(body.read, SSE_PIECE):
            yield data
    finally:
        body.close()


async def _sse(
    request, handle, fmt: str, extra_headers: dict, speed: float = 1.0, whole: bool = False
):
    """OpenAI's speech events: speech.audio.delta (base64) ..., speech.audio.done;
    `whole`: the deltas are one file's pieces, sent once it is all made."""
    try:
        await started(request, handle)
    except m.PoolError as e:
        return error_response(e)
    enc = stream_encoder(fmt, speed)

    def event(obj: dict) -> bytes:
        return f"data: {json.dumps(obj)}\n\n".encode()

    async def body():
        try:
            made = _whole(handle, fmt, speed) if whole else encoded(handle, enc)
            async with contextlib.aclosing(made) as pieces:
                async for data in pieces:
                    if data:
                        yield event({"type": "speech.audio.delta", "audio": _b64(data)})
        except m.PoolError as e:
            yield event({"type": "error", "error": {"message": e.message, "code": e.kind.value}})
            return
        done = handle.outcome
        yield event(
            {
                "type": "speech.audio.done",
                "usage": usage(done.audio_s, speed),
                "stop_reason": done.stop_reason,
            }
        )

    headers = headers_for(handle) | extra_headers | STREAM_HEADERS
    return WatchedStream(body(), media_type="text/event-stream", headers=headers)


def usage(audio_s: float, speed: float = 1.0) -> dict:
    """speech.audio.done's usage: OpenAI's three token counts (clients typed from its
    spec require them) and the seconds of audio sent (made at `speed`). The output
    tokens are the model's audio tokens (7.5 a second of what it made); the text's
    are not counted here (0)."""
    out = math.ceil(round(audio_s * AUDIO_TOKENS_PER_S, 6))
    return {
        "input_tokens": 0,
        "output_tokens": out,
        "total_tokens": out,
        "audio_seconds": round(tempo.seconds_at(audio_s, speed), 3),
    }


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def router(front) -> APIRouter:
    """The OpenAI-compatible routes (see the module docstring)."""
    router = APIRouter()
    pool = front.pool
    created = int(time.time())
    declared = parse_openai_map(front.cfg.openai_voices)  # checked at launch (server.py)

    def model(model_id: str) -> dict:
        return {"id": model_id, "object": "model", "created": created, "owned_by": OWNER}

    @router.get("/v1/models", response_model=ModelList)
    async def list_models():
        return {"object": "list", "data": [model(i) for i in MODEL_IDS]}

    @router.get("/v1/models/{model_id}", response_model=ModelCard)
    async def get_model(model_id: str):
        if model_id not in MODEL_IDS:
            return plain_error(
                404, "not_found", f"no model {model_id[:80]!r}; GET /v1/models lists them"
            )
        return model(model_id)

    @router.get("/v1/audio/models", response_model=AudioModels)
    async def audio_models():
        return {"models": [{"id": i, "name": i} for i in MODEL_IDS]}

    @router.get("/v1/audio/voices", response_model=AudioVoices)
    async def audio_voices(names: bool = False):
        presets = front.voices.names()
        if names:
            return {"voices": presets}
        return {"voices": [{"id": n, "name": n} for n in presets]}

    @router.post("/v1/audio/speech")
    async def speech(body: SpeechBody, request: Request):
        fmt = check(body, front.cfg.max_text_chars)
        speed = tempo.check_speed(body.speed)
        voice = body.voice if isinstance(body.voice, str) else body.voice.id
        preset = resolve_voice(front.voices, voice, declared)
        stream = streams(body, fmt)
        # SpeechBody has validated every field this body takes: not again.
        synth = SynthesizeBody.model_construct(
            script=body.input,
            speakers=[Speaker.model_construct(voice=preset, audio=None)] if preset else [],
            cfg_scale=DEFAULT_CFG if body.cfg_scale is None else body.cfg_scale,
            inference_steps=body.inference_steps,
            seed=body.seed,
            format=fmt,
            stream=stream,
        )
        req = await asyncio.to_thread(front.build_request, synth)
        handle = pool.submit(req, tenant_of(request.scope, front.keys))
        extra = {"X-Voice": quote(preset or MODEL_VOICE), "X-Model": quote(body.model)}
        if body.stream_format == "sse":  # flac in whole pieces, unless "stream": true
            whole = fmt == "flac" and body.stream is not True
            return await _sse(request, handle, fmt, extra, speed, whole=whole)
        if stream:
            resp = await stream_response(request, handle, fmt, speed)
        else:
            resp = await run_to_response(request, handle, fmt, speed)
        if resp.status_code == 200:
            resp.headers.update(extra)
        return resp

    return router
