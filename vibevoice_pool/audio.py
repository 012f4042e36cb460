"""Audio in and out of the pool, on the parent side.

Owns: turning uploaded voice samples (wav/mp3/flac/ogg bytes, or base64 text)
into float32 mono 24 kHz numpy arrays, and turning the float32 audio the
workers send back into whole files (wav, mp3, flac, opus, raw pcm; streams and
aac are vibevoice_pool.encoders', built on these). Crossing its border: numpy arrays at workers.wire.messages
SAMPLE_RATE on one side, bytes plus a content type on the other. Every
problem with user input is a PoolError(BAD_INPUT) whose message says what was
wrong and what to do; an upload over the byte limit is TooLarge (HTTP 413).
"""

from __future__ import annotations

import base64
import binascii
import io
import struct
import threading

import numpy as np
import soundfile as sf
import soxr

from workers.wire.messages import SAMPLE_RATE, ErrorKind, PoolError

SUPPORTED_FORMATS: tuple[str, ...] = ("wav", "mp3", "flac", "opus", "pcm")

# format name -> (libsndfile container, libsndfile subtype, content type)
_CODECS: dict[str, tuple[str, str, str]] = {
    "wav": ("WAV", "PCM_16", "audio/wav"),
    "mp3": ("MP3", "MPEG_LAYER_III", "audio/mpeg"),
    "flac": ("FLAC", "PCM_16", "audio/flac"),
    "opus": ("OGG", "OPUS", "audio/ogg"),
}
# Raw 16-bit little-endian mono samples at SAMPLE_RATE, no header.
PCM_CONTENT_TYPE = "audio/pcm"
_READ_BLOCK = 1 << 16  # frames read per block while decoding


class TooLarge(PoolError):
    """An upload over the byte limit (the HTTP layer answers 413 `too_large`, as for a
    body over the limit)."""

    code = "too_large"

    def __init__(self, message: str):
        super().__init__(ErrorKind.BAD_INPUT, message)


class NotAudio(PoolError):
    """Bytes that are no audio file this server reads (the HTTP layer answers 415
    `unsupported_audio`: the content is in a format the route does not take)."""

    code = "unsupported_audio"

    def __init__(self, message: str):
        super().__init__(ErrorKind.BAD_INPUT, message)


def _bad(message: str) -> PoolError:
    return PoolError(ErrorKind.BAD_INPUT, message)


def _size(n: float) -> str:
    """A byte count for people: '512 bytes', '42 KB', '12.3 MB' (1 KB = 1024 bytes)."""
    if n < 1024:
        return f"{int(n)} bytes"
    value, unit = (n / 1024, "KB") if n < 1024 * 1024 else (n / (1024 * 1024), "MB")
    text = f"{value:.1f}"
    return f"{text.removesuffix('.0')} {unit}"


def _secs(s: float) -> str:
    text = f"{s:.1f}"
    return f"{text.removesuffix('.0')} s"


# What an upload may declare in its header, checked before a sample is decoded.
MAX_CHANNELS = 2
MIN_RATE, MAX_RATE = 8_000, 192_000
# Containers libsndfile may parse for an upload; its other formats (MAT, PAF,
# SD2, VOC, ...) are refused before any of their parsers run.
UPLOAD_CONTAINERS = frozenset({"WAV", "WAVEX", "RF64", "W64", "FLAC", "OGG", "MP3", "AIFF", "CAF"})
_decode_slots = threading.BoundedSemaphore(2)
_decode_wait_s = 30.0  # longest an upload waits for a decode slot before 429


def set_decode_slots(n: int, wait_s: float = 30.0) -> None:
    """How many uploads may be decoded at once, and how long one waits for its turn
    (the settings max_decodes and decode_wait_s, at launch)."""
    global _decode_slots, _decode_wait_s
    _decode_slots = threading.BoundedSemaphore(max(1, int(n)))
    _decode_wait_s = float(wait_s)


def _check_header(f: sf.SoundFile, what: str, max_seconds: float) -> None:
    if f.format not in UPLOAD_CONTAINERS:
        raise NotAudio(f"{what} is a {f.format} file; send a wav, mp3, flac or ogg file")
    if not 1 <= f.channels <= MAX_CHANNELS:
        raise _bad(
            f"{what} has {f.channels} channels; at most {MAX_CHANNELS} (mono or stereo) "
            "are accepted. Send a mono recording"
        )
    if not MIN_RATE <= f.samplerate <= MAX_RATE:
        raise _bad(
            f"{what} is sampled at {f.samplerate} Hz; {MIN_RATE // 1000}-{MAX_RATE // 1000} kHz "
            "is accepted. Send a 16, 24, 44.1 or 48 kHz recording"
        )
    if 0 < f.frames < (1 << 62) and f.frames > max_seconds * f.samplerate:
        raise _bad(
            f"{what} is {_secs(f.frames / f.samplerate)} long; the limit is "
            f"{_secs(max_seconds)}. Trim it to a few seconds of clear speech"
        )


def _decode_bounded(f: sf.SoundFile, what: str, max_seconds: float) -> np.ndarray:
    """Read `f` in blocks, each made mono and resampled to SAMPLE_RATE at once: what
    is held is the 24 kHz mono result plus one block, whatever the file declares."""
    rate = f.samplerate
    limit = int(max_seconds * rate)
    stream = None if rate == SAMPLE_RATE else soxr.ResampleStream(rate, SAMPLE_RATE, 1, "float32")
    pieces, total = [], 0
    while True:
        block = f.read(min(_READ_BLOCK, limit + 1 - total), dtype="float32", always_2d=True)
        total += len(block)
        if total > limit:
            raise _bad(
                f"{what} is longer than {_secs(max_seconds)}, the limit. "
                "Trim it to a few seconds of clear speech"
            )
        last = len(block) == 0
        mono = np.nan_to_num(block, nan=0.0, posinf=1.0, neginf=-1.0).mean(axis=1, dtype=np.float32)
        out = mono if stream is None else stream.resample_chunk(mono, last=last)
        if len(out):
            pieces.append(out)
        if last:
            break
    if total == 0 or not pieces:  # none, or too few to leave one at SAMPLE_RATE
        raise _bad(f"{what} contains no audio samples; send a recording of a few seconds")
    return np.concatenate(pieces) if len(pieces) != 1 else pieces[0]


SILENT_PEAK = 1 / 32768  # quieter than one step of 16-bit audio: a silent sample


def decode_upload(
    data: bytes, *, max_bytes: int, max_seconds: float, what: str = "voice sample"
) -> np.ndarray:
    """Decode an audio file's bytes to float32 mono SAMPLE_RATE samples in [-1, 1]: a
    (float) file that goes over full scale is scaled down by its peak, keeping its
    shape, as microsoft's AudioNormalizer.avoid_clipping does, not clipped.

    The header is checked first (container, at most MAX_CHANNELS channels,
    MIN_RATE-MAX_RATE Hz, at most max_seconds); decoding then holds about one
    block plus max_seconds of 24 kHz mono, and at most set_decode_slots() run at
    once (a caller that waits decode_wait_s for a slot gets OVERLOADED).
    `what` names the thing in error messages ("voice sample", "speakers[1].audio").
    Raises TooLarge over max_bytes, NotAudio for bytes that are no wav, mp3, flac or
    ogg file, PoolError(BAD_INPUT) for anything else wrong.
    """
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise _bad(f"{what} must be the bytes of an audio file, not {type(data).__name__}")
    data = bytes(data)
    if not data:
        raise _bad(f"{what} is empty; send a wav, mp3, flac or ogg file")
    if len(data) > max_bytes:
        raise TooLarge(
            f"{what} is {_size(len(data))}; the limit is {_size(max_bytes)}. "
            "Send a shorter clip or a compressed format (mp3, ogg)"
        )
    slots, wait_s = _decode_slots, _decode_wait_s
    if not slots.acquire(timeout=wait_s):
        raise PoolError(
            ErrorKind.OVERLOADED,
            f"too many voice samples are being decoded at once; {what} waited "
            f"{_secs(wait_s)}. Retry in a few seconds",
        )
    try:
        with sf.SoundFile(io.BytesIO(data)) as f:
            _check_header(f, what, max_seconds)
            pcm = _decode_bounded(f, what, max_seconds)
    except sf.SoundFileError:
        raise NotAudio(
            f"{what} could not be read as audio (corrupt, truncated, or not an audio "
            "file); send a wav, mp3, flac or ogg file"
        ) from None
    finally:
        slots.release()
    peak = float(np.max(np.abs(pcm)))
    if peak < SILENT_PEAK:  # nothing to clone (NaN samples decode to silence)
        raise _bad(
            f"{what} is silent: its loudest sample is below -90 dBFS; "
            "send a recording of the voice speaking"
        )
    if peak > 1.0:  # a float file over full scale: scaled down whole, never clipped
        pcm = pcm / np.float32(peak)
    return np.ascontiguousarray(np.clip(pcm, -1.0, 1.0), dtype=np.float32)


_WS = r"[ \t\r\n]*"  # whitespace the decoder drops (line breaks of `base64` output)
_CH = r"(?:[A-Za-z0-9+/_-]" + _WS + ")"  # one character: the standard or URL-safe alphabet
# What base64_bytes takes, for the API schema: an optional data: URL prefix, then
# whole groups of four (the last may end in = or ==), at least one group.
BASE64_PATTERN = (
    f"^{_WS}(?:data:[^,]*,)?{_WS}(?:{_CH}{{4}})*"
    f"(?:{_CH}{{4}}|{_CH}{{2}}={_WS}={_WS}|{_CH}{{3}}={_WS})$"
)


def base64_bytes(text: str | bytes, *, max_bytes: int, what: str = "voice sample") -> bytes:
    """The bytes of base64 text (a bare string or a data: URL; whitespace is
    dropped, the URL-safe alphabet is taken). TooLarge past max_bytes (before
    decoding), PoolError(BAD_INPUT) for text that is not base64 or holds nothing."""
    if isinstance(text, (bytes, bytearray)):
        try:
            text = bytes(text).decode("ascii")
        except UnicodeDecodeError:
            raise _bad(f"{what} is not valid base64 (it holds non-ASCII characters)") from None
    if not isinstance(text, str):
        raise _bad(f"{what} must be a base64 string, not {type(text).__name__}")
    text = text.strip()
    if text.startswith("data:") and "," in text:
        text = text.split(",", 1)[1]  # data:audio/wav;base64,....
    text = "".join(text.split())
    if not text:
        raise _bad(f"{what} is empty; send a base64-encoded wav, mp3, flac or ogg file")
    if len(text) // 4 * 3 > max_bytes + 3:  # refuse before decoding it
        raise TooLarge(
            f"{what} is about {_size(len(text) // 4 * 3)}; the limit is {_size(max_bytes)}. "
            "Send a shorter clip or a compressed format (mp3, ogg)"
        )
    altchars = b"-_" if ("-" in text or "_" in text) else None
    try:
        return base64.b64decode(text, altchars=altchars, validate=True)
    except (binascii.Error, ValueError):
        raise _bad(
            f"{what} is not valid base64; encode the whole audio file with standard "
            "base64 (e.g. `base64 -w0 voice.wav`)"
        ) from None


def decode_base64_upload(
    text: str | bytes, *, max_bytes: int, max_seconds: float, what: str = "voice sample"
) -> np.ndarray:
    """decode_upload for base64 text (see base64_bytes)."""
    data = base64_bytes(text, max_bytes=max_bytes, what=what)
    return decode_upload(data, max_bytes=max_bytes, max_seconds=max_seconds, what=what)


def to_int16(pcm: np.ndarray) -> np.ndarray:
    """Float samples in [-1, 1] -> int16, clipped (infinities too); NaN becomes silence."""
    x = np.array(pcm, dtype=np.float32)  # a copy, changed in place from here
    np.clip(x, -1.0, 1.0, out=x)  # NaN stays NaN here
    x *= 32767.0
    np.rint(x, out=x)  # half to even, as np.round
    nan = np.isnan(x)
    if nan.any():
        x[nan] = 0.0
    return x.astype(np.int16)


def _mono(pcm: np.ndarray) -> np.ndarray:
    x = np.asarray(pcm, dtype=np.float32)
    if x.ndim == 2:
        x = x.mean(axis=1, dtype=np.float32) if x.shape[1] > 1 else x[:, 0]
    elif x.ndim != 1:
        raise ValueError(f"audio must be 1-D (mono) or 2-D (frames, channels), got {x.shape}")
    return x


def _check_format(fmt: str) -> str:
    name = str(fmt).strip().lower()
    if name not in SUPPORTED_FORMATS:
        raise _bad(
            f"audio format {fmt!r} is not supported; use one of: {', '.join(SUPPORTED_FORMATS)}"
        )
    return name


def content_type(fmt: str) -> str:
    """The Content-Type of a supported format's bytes."""
    name = _check_format(fmt)
    return PCM_CONTENT_TYPE if name == "pcm" else _CODECS[name][2]


def encode(pcm: np.ndarray, fmt: str) -> tuple[bytes, str]:
    """Encode float32 mono SAMPLE_RATE audio as `fmt`; returns (bytes, content type).

    Empty input: wav and opus give a valid empty file; flac, mp3 and pcm give b"".
    CPU-bound (mp3/opus of 30 s take about half a second): call it off the event loop.
    """
    name = _check_format(fmt)
    x = _mono(pcm)
    if name == "pcm":
        return to_int16(x).astype("<i2").tobytes(), PCM_CONTENT_TYPE
    container, subtype, ctype = _CODECS[name]
    if name == "wav" and 2 * x.size <= 0xFFFFFFFF - 36:  # (the header's sizes are 32-bit)
        # the header libsndfile writes, then the samples: no codec to call
        data = to_int16(x).astype("<i2", copy=False).tobytes()
        return _wav_header(len(data), SAMPLE_RATE, 1) + data, ctype
    buf = io.BytesIO()
    # Every encoder gets the same int16 samples as the raw pcm and wav stream.
    sf.write(buf, to_int16(x), SAMPLE_RATE, format=container, subtype=subtype)
    return buf.getvalue(), ctype


def wav_header_for_stream(sample_rate: int = SAMPLE_RATE, channels: int = 1) -> bytes:
    """A 16-bit PCM WAV header whose sizes say "as long as it goes" (0xFFFFFFFF).

    Players (browsers, ffmpeg, libsndfile, Python's wave) read such a stream up
    to where the data ends.
    """
    return _wav_header(None, sample_rate, channels)


def _wav_header(data_bytes: int | None, sample_rate: int, channels: int) -> bytes:
    """The 44-byte header of 16-bit PCM WAV; None: sizes of "as long as it goes"."""
    block_align = channels * 2
    fmt_chunk = struct.pack(
        "<4sIHHIIHH", b"fmt ", 16, 1, channels, sample_rate, sample_rate * block_align,
        block_align, 16,
    )  # fmt: skip
    riff, data = (0xFFFFFFFF,) * 2 if data_bytes is None else (36 + data_bytes, data_bytes)
    return (
        b"RIFF" + struct.pack("<I", riff) + b"WAVE" + fmt_chunk + b"data" + struct.pack("<I", data)
    )


def demo_tone(f0: float, seconds: float = 3.5, seed: int = 0) -> np.ndarray:
    """A synthetic voice sample (the demo voices): a harmonic tone at `f0` with
    intonation, vibrato and syllable-like loudness; never a recording."""
    t = np.arange(int(seconds * SAMPLE_RATE)) / SAMPLE_RATE
    # Pitch glides like intonation, with a 5.5 Hz vibrato of 1.5 %.
    contour = 1.0 + 0.06 * np.sin(2 * np.pi * 0.4 * t + seed)
    freq = f0 * contour * (1.0 + 0.015 * np.sin(2 * np.pi * 5.5 * t))
    phase = 2 * np.pi * np.cumsum(freq) / SAMPLE_RATE
    voice = sum(np.sin(k * phase) / k**1.3 for k in range(1, 9))
    # Syllable-like loudness at ~3.5 Hz, fades at both ends.
    syllables = 0.55 + 0.45 * np.sin(2 * np.pi * 3.5 * t + seed) ** 2
    fade = np.minimum(1.0, np.minimum(t, t[-1] - t) / 0.05)
    out = voice * syllables * fade
    return (0.5 * out / np.max(np.abs(out))).astype(np.float32)


def float_blocks(f, samples: int, block: int):
    """`samples` float32 samples read from the binary file `f` at its position, `block`
    at a time (a job's progress audio, an answer's spilled audio); OSError when the
    file ends first."""
    left = samples
    while left:
        part = np.frombuffer(f.read(4 * min(block, left)), dtype=np.float32)
        if not len(part):
            raise OSError(
                f"{getattr(f, 'name', 'a file')} holds {samples - left} of {samples} samples"
            )
        left -= len(part)
        yield part
