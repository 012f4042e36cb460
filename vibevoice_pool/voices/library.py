"""The voice presets folder: listing, matching, loading, adding and deleting voices.

Owns: one folder of voice samples (wav, mp3, flac, ogg files named like `en-Alice_woman.wav`),
a cache of their decoded audio, safe file names for voices users add, and the synthetic demo
voices: tones, written when the folder is empty and offered only with the tiny model or the
simulator (prepare_voices). Real weights would clone a tone, so with them the demo voices are
hidden, and a speaker without a sample gets no voice prompt: the model speaks in its own voice
(MODEL_VOICE_NOTE). Crossing its border: voice names (str) in, float32 mono SAMPLE_RATE numpy
arrays out (what a Request carries), upload bytes in via add(). Every user mistake is
PoolError(BAD_INPUT) (TooLarge for oversized uploads, NotAudio for bytes that are no sound file,
VoiceNotFound for a name it does not hold); no path outside the folder is ever read, written or
removed.

Ownership (owners.py): a voice added through add() records its uploader; a file put
in the folder by the operator has no owner and is a preset, and only an admin overwrites
or deletes a preset or another owner's voice (VoiceForbidden otherwise). The OpenAI voice
names (OPENAI_VOICES) map to presets only (openai_voice), never to an upload,
and no upload may take one of those names, or a preset's short name ("Alice");
the forgiving forms of a name try every preset before any upload: no upload
captures what another caller asked for by a preset's name. Servers that share
the folder change it one at a time (an flock on the folder, folder.py): no owner is lost.
"""

from __future__ import annotations

import logging
import os
import re
import threading
import time
import unicodedata
from pathlib import Path

import numpy as np

from vibevoice_pool.audio import decode_upload, demo_tone, encode
from vibevoice_pool.voices.folder import VOICE_EXTENSIONS, folder_turn, list_voices, write_atomic
from vibevoice_pool.voices.owners import VoiceOwners
from workers.wire.messages import ErrorKind, PoolError

MAX_NAME_LENGTH = 64
LISTING_MAX_AGE_S = 2.0  # a change the folder's mtime misses is seen within this
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")
log = logging.getLogger("vibevoice_pool")
OPENAI_VOICES = tuple(
    "alloy ash ballad coral echo fable nova onyx sage shimmer verse marin cedar".split()
)
MODEL_VOICE = "none (the model's own voice)"  # what X-Voice says when no preset was used
MODEL_VOICE_NOTE = (
    "A speaker without a voice sample gets no voice prompt and speaks in the model's own "
    "voice. Add presets by putting wav/mp3/flac/ogg files in the voices folder, with "
    "POST /v1/voices, or on the page's voice tab; or send a sample with the request."
)


def _bad(message: str) -> PoolError:
    return PoolError(ErrorKind.BAD_INPUT, message)


class VoiceNotFound(PoolError):
    """A request named a voice the folder does not hold (the HTTP layer answers 404
    `voice_not_found`: a missing resource, not a malformed request)."""

    code = "voice_not_found"

    def __init__(self, message: str):
        super().__init__(ErrorKind.BAD_INPUT, message)


class VoiceUnreadable(PoolError):
    """A stored voice file that does not decode: the server's fault (HTTP 500)."""

    code = "voice_unreadable"

    def __init__(self, message: str):
        super().__init__(ErrorKind.ENGINE_ERROR, message)


def safe_voice_name(name: str) -> str:
    """A name fit to be a file stem in the folder, or BAD_INPUT saying why not.

    Spaces and other characters become '_', accents are dropped, a trailing
    audio extension is removed; path separators, '..' and a leading dot are refused.
    """
    if not isinstance(name, str) or not name.strip():
        raise _bad("a voice needs a name: letters, digits, '-', '_' or '.' (e.g. en-Maria_woman)")
    raw = name.strip()
    if "/" in raw or "\\" in raw or "\x00" in raw or ".." in raw or raw.startswith("."):
        raise _bad(
            f"voice name {name!r} is not allowed: no '/', '\\', '..' or leading '.'; "
            "use letters, digits, '-', '_' and '.' (e.g. en-Maria_woman)"
        )
    stem, ext = os.path.splitext(raw)
    if ext.lower() in VOICE_EXTENSIONS and stem:
        raw = stem
    ascii_name = unicodedata.normalize("NFKD", raw).encode("ascii", "ignore").decode("ascii")
    safe = _UNSAFE.sub("_", ascii_name).strip("._-")[:MAX_NAME_LENGTH].rstrip("._-")
    if not safe or not any(c.isalnum() for c in safe) or ".." in safe:
        raise _bad(
            f"voice name {name!r} has no usable characters; use letters, digits, "
            "'-', '_' and '.' (e.g. en-Maria_woman)"
        )
    return safe


class VoiceLibrary(VoiceOwners):
    """The voices in one folder. Thread-safe; the folder may change underneath."""

    def __init__(
        self,
        folder: str | os.PathLike,
        *,
        max_bytes: int,
        max_seconds: float,
        offer_demo: bool = True,
    ):
        """`offer_demo=False` (real weights) hides the synthetic demo voices."""
        self.folder = Path(folder)
        self.offer_demo = offer_demo
        self.max_bytes = max_bytes
        self.max_seconds = max_seconds
        self._lock = threading.Lock()
        # name -> (path, (mtime_ns, size), samples)
        self._cache: dict[str, tuple[Path, tuple[int, int], np.ndarray]] = {}
        self._listed: tuple[int, float, dict[str, Path]] | None = None  # mtime_ns, when, names
        self._owned: tuple[tuple, dict[str, str]] | None = None  # (ino, size, mtime_ns), owners
        self._damaged = False  # the owners file as last read did not parse as one

    def openai_voice(self, voice: str, declared: dict[str, str] | None = None) -> str | None:
        """The preset an OpenAI voice name plays: the declared one (openai_voices
        setting), else a preset of that very name, else the presets in a fixed
        order; None when there is no preset. Uploads never take part."""
        low = voice.strip().lower()
        chosen = (declared or {}).get(low)
        if chosen is not None:
            if chosen not in self._listing():
                raise _bad(
                    f"the voice {voice!r} is set to the preset {chosen!r} (openai_voices), "
                    "which is not in the voices folder; ask the operator"
                )
            return chosen
        presets = self.presets()
        same = [n for n in presets if n.lower() == low]
        if same:
            return same[0]
        if not presets:
            return None
        return presets[OPENAI_VOICES.index(low) % len(presets)]

    def _listing(self) -> dict[str, Path]:
        """The folder's voices, listed again only when the folder changed (its
        mtime), or LISTING_MAX_AGE_S passed, or we changed it ourselves."""
        try:
            stamp = os.stat(self.folder).st_mtime_ns
        except FileNotFoundError:
            stamp = -1
        now = time.monotonic()
        listed = self._listed
        if listed is not None and listed[0] == stamp and now - listed[1] < LISTING_MAX_AGE_S:
            return listed[2]
        found = list_voices(self.folder)
        if not self.offer_demo:
            found = {n: p for n, p in found.items() if n not in _DEMO_VOICES}
        self._listed = (stamp, now, found)
        return found

    def names(self) -> list[str]:
        return sorted(self._listing())

    def match(self, name: str) -> str:
        """The preset name `name` refers to, or BAD_INPUT listing some that exist.

        Exact name first, then the same name in any case, then the short name
        ("Alice" of "en-Alice_woman"), then a case-insensitive partial match either
        way round (as the old VibeVoice demo did); the shortest wins. The forgiving
        forms try every preset before any upload, so an upload never answers a
        name that finds a preset.
        """
        voices = self._listing()
        query = name.strip() if isinstance(name, str) else ""
        if query in voices:
            return query
        if not query:
            raise _bad(f"a voice name is needed; available voices: {self._some(voices)}")
        low = query.lower()
        ranked = sorted(voices, key=lambda n: (len(n), n))
        for candidate in ranked:
            if candidate.lower() == low:
                return candidate
        owners = self._owners()
        presets = [n for n in ranked if n not in owners]
        uploads = [n for n in ranked if n in owners]
        for group in (presets, uploads):
            for test in (
                lambda n: _short_name(n).lower() == low,
                lambda n: low in n.lower() or n.lower() in low,
            ):
                for candidate in group:
                    if test(candidate):
                        return candidate
        raise VoiceNotFound(f"unknown voice {name!r}; available voices: {self._some(voices)}")

    @staticmethod
    def _some(voices: dict[str, Path], limit: int = 8) -> str:
        if not voices:
            return "none (add one, or upload a voice sample with the request)"
        shown = sorted(voices)[:limit]
        more = len(voices) - len(shown)
        return ", ".join(shown) + (f" and {more} more (GET /v1/voices lists all)" if more else "")

    def resolve(self, name: str) -> np.ndarray:
        """The voice sample of `name` (see match) as float32 mono SAMPLE_RATE audio."""
        preset = self.match(name)
        path = self._listing().get(preset)
        if path is None:  # removed between the two listings
            raise VoiceNotFound(f"voice {preset!r} was just removed; available: {self.names()}")
        try:
            st = path.stat()
        except FileNotFoundError:
            raise VoiceNotFound(f"voice {preset!r} was just removed; choose another") from None
        stamp = (st.st_mtime_ns, st.st_size)
        with self._lock:
            hit = self._cache.get(preset)
            if hit is not None and hit[0] == path and hit[1] == stamp:
                return hit[2]
        try:
            samples = decode_upload(
                path.read_bytes(),
                max_bytes=max(self.max_bytes, st.st_size),  # presets are trusted to be big
                max_seconds=self.max_seconds,
                what=f"voice preset {preset!r}",
            )
        except PoolError as e:  # a file on the server, not the request's doing
            log.warning(
                "voice %r (%s) cannot be used: %s; replace or remove it", preset, path, e.message
            )
            raise VoiceUnreadable(
                f"the server's voice {preset!r} cannot be read ({e.message}); choose another "
                "voice (the server's log names the file)"
            ) from None
        samples.setflags(write=False)  # shared between requests: nobody may edit it
        with self._lock:
            self._cache[preset] = (path, stamp, samples)
        return samples

    def add(
        self,
        name: str,
        data: bytes,
        *,
        overwrite: bool = False,
        owner: str = "upload",
        admin: bool = True,
    ) -> str:
        """Validate an uploaded sample and store it as `<safe name>.wav` (16-bit, scaled
        to full scale), owned by `owner`; returns the name. VoiceForbidden when a voice of that name is not
        the caller's to overwrite (see the module doc)."""
        safe = safe_voice_name(name)
        if safe.lower() in OPENAI_VOICES:
            raise _bad(
                f"the name {safe!r} is an OpenAI voice name, kept for the presets it maps to; "
                "choose another name"
            )
        samples = decode_upload(
            data,
            max_bytes=self.max_bytes,
            max_seconds=self.max_seconds,
            what="voice sample",
        )
        with self._lock, folder_turn(self.folder):  # and the other servers' turns
            named = [p for p in self.presets() if p.lower() != safe.lower()]
            shadowed = [p for p in named if _short_name(p).lower() == safe.lower()]
            if shadowed:
                raise _bad(
                    f"the name {safe!r} is how requests name the preset {shadowed[0]!r}; "
                    "choose another name"
                )
            taken = [n for n in self._listing() if n.lower() == safe.lower()]
            if taken and not overwrite:
                raise _bad(
                    f"a voice named {taken[0]!r} already exists; choose another name, "
                    "or send overwrite=true to replace it"
                )
            for old in taken:
                self._check_may_change(old, owner, admin)
            for old in taken:  # same name, other extension or case: replaced
                if old != safe or self._listing()[old].suffix.lower() != ".wav":
                    self._remove(old)
            owners = self._owners()
            owners[safe] = owner
            self._save_owners(owners)  # first: a crash leaves an owner, never a free preset
            # at its peak, so that 16 bits keep a quiet (float or 24-bit) recording whole:
            # the model normalises every sample to -25 dBFS, so the level is not kept
            wav, _ = encode(samples / np.max(np.abs(samples)), "wav")
            write_atomic(self.folder, safe + ".wav", wav)
            self._cache.pop(safe, None)
            self._listed = None
        return safe

    def delete(self, name: str, *, owner: str | None = None, admin: bool = True) -> None:
        """Remove the stored voice with exactly this name (no partial matching).
        VoiceForbidden when it is not the caller's (see the module doc)."""
        with self._lock, folder_turn(self.folder):
            if not isinstance(name, str) or name not in self._listing():
                raise _bad(f"no voice named {name!r} to delete; voices: {self.names()}")
            self._check_may_change(name, owner, admin)
            self._remove(name)

    def _remove(self, name: str) -> None:
        path = self._listing().get(name)
        if path is None:
            return
        folder = self.folder.resolve()
        # The file itself (not a link target) must sit directly in the folder.
        if path.parent.resolve() != folder:
            raise _bad(f"voice {name!r} is not inside the voices folder; not removed")
        path.unlink(missing_ok=True)
        self._cache.pop(name, None)
        self._listed = None
        owners = self._owners()
        if owners.pop(name, None) is not None:
            self._save_owners(owners)


def _short_name(name: str) -> str:
    """'en-Alice_woman' -> 'Alice' (the old demo's simplified preset names)."""
    return name.split("_")[0].split("-")[-1]


# ---- demo voices ----------------------------------------------------------

# Our own synthetic samples: harmonic tones with vibrato, never a recording.
_DEMO_VOICES: dict[str, float] = {
    "demo-Alice_woman": 220.0,
    "demo-Bob_man": 110.0,
    "demo-Carol_woman": 262.0,
    "demo-Dave_man": 131.0,
}


def prepare_voices(folder: str | os.PathLike, *, synthetic: bool) -> tuple[list[str], str]:
    """Ready the presets folder at launch: the demo voices written (only when `synthetic`,
    the tiny model or the simulator, and the folder holds none), and a line for the log."""
    path = Path(folder)
    path.mkdir(parents=True, exist_ok=True)
    if synthetic:
        made = ensure_demo_voices(path)
        if made:
            return made, (
                f"Wrote {len(made)} synthetic demo voices to {path} (tones, for the tiny model "
                "and the simulator; put your own wav/mp3/flac/ogg there)"
            )
        return [], ""
    real = [n for n in list_voices(path) if n not in _DEMO_VOICES]
    if real:
        return [], ""
    return [], f"No voice presets in {path}. {MODEL_VOICE_NOTE}"


def ensure_demo_voices(folder: str | os.PathLike) -> list[str]:
    """Write the synthetic demo voices when `folder` holds no voice; returns names written."""
    path = Path(folder)
    if list_voices(path):
        return []
    written = []
    for i, (name, f0) in enumerate(_DEMO_VOICES.items()):
        wav, _ = encode(demo_tone(f0, seed=i), "wav")
        write_atomic(path, name + ".wav", wav)
        written.append(name)
    return written
