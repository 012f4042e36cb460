"""The voice presets over HTTP: /v1/voices.

    GET    /v1/voices          {"voices": [{"name": ...}, ...]}
    GET    /v1/voices/{name}   {"name", "preset": true for the operator's files}; 404
    POST   /v1/voices          add one: multipart (file, name, overwrite) or JSON
                               {"name", "audio": base64, "overwrite"}; answers 201
                               {"name": <the stored, sanitised name>}
    DELETE /v1/voices/{name}   remove one (exact name); 404 when there is none

The VoiceLibrary does the checking: the sample must decode as audio within the
size and duration limits (TooLarge -> 413; bytes that are no sound file, NotAudio
-> 415 unsupported_audio), and the name becomes a safe file stem inside the
voices folder ('..' and '/' are refused with 400). A field an upload does not
take is refused with 400, as the schema says (additionalProperties: false).
Ownership (with API keys): an upload belongs to the key that sent it; a user
key that overwrites or deletes a preset or another key's voice gets 403
`forbidden` (VoiceLibrary's VoiceForbidden). Admin keys may change any voice.
A write the folder's disk refuses (full, a file size limit, read-only) gets 507
`disk_full` naming the folder.
"""

from __future__ import annotations

import asyncio
import json

from fastapi import APIRouter, Path, Request
from fastapi.responses import JSONResponse
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException

from vibevoice_pool.api.auth import caller_of
from vibevoice_pool.api.errors import body_parse_message, plain_error
from vibevoice_pool.audio import BASE64_PATTERN, base64_bytes
from vibevoice_pool.voices.library import MODEL_VOICE_NOTE, safe_voice_name
from vibevoice_pool.voices.owners import VoiceForbidden
from workers.wire.messages import ErrorKind, PoolError

FORM_HINT = (
    "send multipart/form-data with a 'file' (wav, mp3, flac or ogg) and a 'name', "
    'or JSON {"name": "...", "audio": "<base64 of the file>"}'
)


NAME_PATTERN = r"^(?![.])(?!.*[.][.])[^/\\\x00]*[A-Za-z0-9][^/\\\x00]*$"
_UPLOAD_SCHEMA = {
    "type": "object",
    "additionalProperties": False,  # _only_known
    "required": ["name"],
    "properties": {
        "name": {
            "type": "string",
            "minLength": 1,
            # what safe_voice_name keeps: a letter or digit, no '/', '\\', '..', leading '.'
            "pattern": NAME_PATTERN,
            "description": "the voice's name (letters, digits, '-', '_', '.')",
        },
        "overwrite": {"type": "boolean", "default": False},
    },
}
UPLOAD_DOC = {  # the body is read by hand (two content types): declared here
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    **_UPLOAD_SCHEMA,
                    "required": ["file", "name"],
                    "properties": {
                        **_UPLOAD_SCHEMA["properties"],
                        "file": {"type": "string", "format": "binary", "minLength": 1},
                    },
                }
            },
            "application/json": {
                "schema": {
                    **_UPLOAD_SCHEMA,
                    "required": ["name", "audio"],
                    "properties": {
                        **_UPLOAD_SCHEMA["properties"],
                        "audio": {
                            "type": "string",
                            "minLength": 1,
                            "contentEncoding": "base64",
                            "pattern": BASE64_PATTERN,
                            "description": "base64 of the file (a data: URL too)",
                        },
                    },
                }
            },
        },
    }
}


# A voice's name in a path: declared with the pattern names are made to (documented,
# not enforced: a file the operator named otherwise is still found by its name).
NAME = Path(..., json_schema_extra={"pattern": NAME_PATTERN})


def _bad(message: str) -> PoolError:
    return PoolError(ErrorKind.BAD_INPUT, message)


def _only_known(fields, known: tuple[str, ...]) -> None:
    """Refuse a field the upload does not take, as the other bodies do (the schema
    says additionalProperties: false)."""
    unknown = sorted({str(f) for f in fields} - set(known))
    if unknown:
        raise _bad(f"unknown field {unknown[0][:60]!r}; an upload takes {', '.join(known)}")


def _flag(value) -> bool:
    if isinstance(value, bool):
        return value
    return str(value).strip().lower() in ("1", "true", "yes", "on")


async def _read_upload(request: Request, max_bytes: int) -> tuple[str, bytes, bool]:
    """(name, file bytes, overwrite) from a multipart form or a JSON body."""
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if ctype == "multipart/form-data":
        try:
            form = await request.form(max_files=1, max_fields=8)
        except StarletteHTTPException as e:  # the multipart parser's limits and errors
            raise _bad(f"{str(e.detail).rstrip('.')}; {FORM_HINT}") from None
        _only_known(form.keys(), ("file", "name", "overwrite"))
        upload = form.get("file")
        if not isinstance(upload, UploadFile):
            raise _bad(f"no 'file' field in the form; {FORM_HINT}")
        data = await upload.read()
        name = form.get("name") or (upload.filename or "").rsplit(".", 1)[0]
        if not isinstance(name, str):
            raise _bad("'name' must be text")
        return name, data, _flag(form.get("overwrite", False))
    if ctype == "application/json":
        try:
            body = json.loads(await request.body())
        except json.JSONDecodeError as e:
            raise _bad(f"the body is not valid JSON ({e}); {FORM_HINT}") from None
        except (ValueError, RecursionError) as e:  # not UTF-8, nested too deep, a huge number
            why = body_parse_message(e, "").split(";")[0]
            raise _bad(f"{why}; {FORM_HINT}") from None
        if not isinstance(body, dict):
            raise _bad(f"the body must be a JSON object; {FORM_HINT}")
        _only_known(body, ("name", "audio", "overwrite"))
        name, audio = body.get("name"), body.get("audio")
        if not isinstance(name, str) or not isinstance(audio, str):
            raise _bad(f"'name' and 'audio' must both be strings; {FORM_HINT}")
        data = base64_bytes(audio, max_bytes=max_bytes, what="'audio'")
        overwrite = body.get("overwrite", False)
        if not isinstance(overwrite, bool):
            raise _bad("'overwrite' must be true or false")
        return name, data, overwrite
    raise _bad(f"unsupported content type {ctype or 'none'!r}; {FORM_HINT}")


def _not_stored(front, e: OSError):
    """507 disk_full: the voices folder would not take the write (the voice is unchanged,
    or, deleted, may still name its uploader as its owner). Counted for /metrics."""
    why, library = e.strerror or str(e), front.voices
    if front.activity is not None:
        front.activity.refused("disk_full")
        front.activity.no_room("voices", str(library.folder))
    return plain_error(
        507, "disk_full", f"the voices folder {str(library.folder)!r} could not be written ({why})"
    )


def router(front) -> APIRouter:
    """GET, POST and DELETE /v1/voices."""
    router = APIRouter()
    library = front.voices

    @router.get("/v1/voices")
    async def list_voices():
        names = library.names()
        if not names:  # say what a speaker without a sample sounds like
            return {"voices": [], "note": MODEL_VOICE_NOTE}
        return {"voices": [{"name": n} for n in names]}

    @router.post("/v1/voices", status_code=201, openapi_extra=UPLOAD_DOC)
    async def add_voice(request: Request):
        caller = caller_of(request.scope)
        name, data, overwrite = await _read_upload(request, library.max_bytes)
        try:
            stored = await asyncio.to_thread(
                library.add,
                name,
                data,
                overwrite=overwrite,
                owner=caller.owner or "upload",
                admin=caller.admin,
            )
        except VoiceForbidden as e:
            return plain_error(403, "forbidden", e.message)
        except OSError as e:  # a full disk (ENOSPC), a file size limit (EFBIG), read-only
            return _not_stored(front, e)
        return JSONResponse({"name": stored, "renamed": stored != name.strip()}, 201)

    @router.get("/v1/voices/{name:path}")
    async def get_voice(name: str = NAME):
        if name not in library.names():  # exact: a deleted voice reads as gone
            return plain_error(404, "not_found", f"no voice named {name!r}; GET /v1/voices")
        return {"name": name, "preset": library.owner(name) is None}

    @router.delete("/v1/voices/{name:path}")
    async def delete_voice(request: Request, name: str = NAME):
        caller = caller_of(request.scope)
        if name not in library.names():
            safe = safe_voice_name(name)  # '../x', 'a/b': 400 saying why
            hint = f" (did you mean {safe!r}?)" if safe in library.names() else ""
            return plain_error(404, "not_found", f"no voice named {name!r}{hint}; GET /v1/voices")
        try:
            await asyncio.to_thread(library.delete, name, owner=caller.owner, admin=caller.admin)
        except VoiceForbidden as e:
            return plain_error(403, "forbidden", e.message)
        except OSError as e:
            return _not_stored(front, e)
        return {"deleted": name}

    return router
