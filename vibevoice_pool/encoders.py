"""Response audio: the formats the server answers in, whole or as a stream.

    check_format(name)     the canonical name, or BAD_INPUT listing the formats
    content_type(name)     the Content-Type of that format's bytes
    encode(pcm, name)      one whole file (bytes, content type)
    write_whole(out, pieces, samples, name)
                           the same file, its audio given in pieces and its bytes
                           written to a seekable file as they are made (a job's
                           result: its audio is on disk, not in memory)
    StreamEncoder(name)    start() / push(pcm) per chunk / end(): bytes that play
                           while they arrive, in every format

wav and pcm are written here directly (a header whose sizes say "as long as
it goes", then 16-bit samples). mp3, opus (in Ogg), aac (ADTS) and flac go
through FFmpeg's encoders by PyAV into a non-seekable sink, so each push
gives the packets the encoder has finished: an mp3 frame, an Ogg page, an
ADTS frame, a FLAC frame. The codecs hold back a little (an mp3 or aac frame
is 1,152 or 1,024 samples, an Ogg page at most PAGE_MS of audio); end()
flushes the rest. Every encoder gets the same int16 samples as raw pcm.
Opus is coded at OPUS_BIT_RATE (32 kb/s, speech), whole files and streams alike.

Whole files: wav and flac as before (libsndfile through vibevoice_pool.audio);
mp3, aac and opus through the stream encoder. A whole mp3 starts with a LAME
"Info" frame (mp3_info_frame: frame count, encoder delay, end padding), so
FFmpeg and mpg123 decode it to the samples made; libsndfile's own mp3 was VBR
(a stream's rate differed) and lost that tag at some constant rates. An ADTS file
is a stream, and libsndfile's Ogg Opus writer never feeds the encoder its
look-ahead at the end, so the last 4 ms of its files decoded as noise. (Pages
of a second, FFmpeg's default, would not do for a whole file either: a file of
one audio page decodes 6.5 ms too long, one of two pages not at all.)

Streamed lengths. Opus in Ogg decodes to exactly the samples made, whole or
streamed (its header's pre-skip and the last page's granule position). A
streamed mp3 or aac cannot: its length is known only at its end, and neither
format has a place for it at the start. LAME's tag would need its frame count
or byte size, or FFmpeg decodes the tag frame itself as 576 samples of silence
and mpg123 ignores the delay; ADTS has no field for priming or padding. So a
streamed mp3 decodes MP3_STREAM_LEAD samples of priming (encoder 576 + decoder
529: 46 ms) before the audio and up to a frame (576) after it (46-70 ms in all,
measured); an aac stream, or whole file, AAC_LEAD (1,024: 43 ms) and up to 1,024
after (43-85 ms). A client wanting exact lengths takes a whole mp3, or opus.

Cost, 30 s of audio in 0.5 s chunks on one core of the 2-core dev machine
(others' tests running; best of 3): mp3 0.29 s (4 ms a chunk), opus 0.19 s,
aac 0.31 s, flac 0.04 s (before mp3 and opus moved to 48 and 32 kb/s; a whole mp3,
opus or aac file costs what its stream does); libsndfile's whole flac takes 0.03 s.
Pushes of the codecs run in a thread (run()).
"""

from __future__ import annotations

import asyncio
import struct
import threading

import numpy as np
import soundfile as sf

from vibevoice_pool import audio
from workers.wire.messages import SAMPLE_RATE, ErrorKind, PoolError

SUPPORTED_FORMATS: tuple[str, ...] = ("wav", "mp3", "flac", "opus", "aac", "pcm")
CONTENT_TYPES = {
    "wav": "audio/wav",
    "mp3": "audio/mpeg",
    "flac": "audio/flac",
    "opus": "audio/ogg",
    "aac": "audio/aac",
    "pcm": audio.PCM_CONTENT_TYPE,
}
# format -> (PyAV container format, codec, container options, bit rate or None)
PAGE_MS = 60  # the longest Ogg page: what an opus stream may hold back
# Opus: 32 kb/s, the top of the 28-40 kb/s that RFC 6716 (section 2.1.1, by
# libopus's authors) gives for full-band speech; at 24 kHz libopus codes the
# whole 12 kHz band at it. FFmpeg's default (64 kb/s a channel) doubled the files.
OPUS_BIT_RATE = 32_000
# mp3: constant 48 kb/s, whole files and streams alike (they were VBR from
# libsndfile, about 46 kb/s, against LAME's default of 32 kb/s in a stream).
# At 24 kHz LAME low-passes 32 kb/s at about 8 kHz, 48 kb/s at 11 kHz: the
# speech band the model makes.
MP3_BIT_RATE = 48_000
_FFMPEG = {
    "mp3": ("mp3", "libmp3lame", {"id3v2_version": "0", "write_xing": "0"}, MP3_BIT_RATE),
    "opus": ("ogg", "libopus", {"page_duration": str(PAGE_MS * 1000)}, OPUS_BIT_RATE),
    "aac": ("adts", "aac", {}, None),
    "flac": ("flac", "flac", {}, None),
}
INLINE = ("wav", "pcm")  # cheap enough to encode on the event loop


async def run(enc: StreamEncoder, step, *args) -> bytes:
    """One step of `enc` (start, push, end) from the event loop: wav and pcm inline
    (a copy), the codecs in a thread (an mp3 frame costs more than a thread hop)."""
    if enc.inline:
        return step(*args)
    return await asyncio.to_thread(step, *args)


def check_format(fmt) -> str:
    """The canonical name of a supported format; BAD_INPUT naming them otherwise."""
    name = str(fmt).strip().lower()
    if name not in SUPPORTED_FORMATS:
        raise PoolError(
            ErrorKind.BAD_INPUT,
            f"audio format {str(fmt)[:40]!r} is not supported; use one of: "
            + ", ".join(SUPPORTED_FORMATS),
        )
    return name


def content_type(fmt: str) -> str:
    return CONTENT_TYPES[check_format(fmt)]


def encode(pcm: np.ndarray, fmt: str) -> tuple[bytes, str]:
    """One whole file of float32 mono SAMPLE_RATE audio as `fmt`: (bytes, content type).
    CPU-bound for the compressed formats: call it off the event loop."""
    name = check_format(fmt)
    if name not in ("aac", "opus", "mp3"):
        return audio.encode(pcm, name)
    enc = StreamEncoder(name)
    data = enc.start() + enc.push(pcm) + enc.end()
    if name == "mp3":
        data = mp3_info_frame(data, enc.samples) + data
    return data, enc.content_type


# LAME's encoder delay at our rate, and the mp3 decoder's own (528 + 1, as
# LAME's tag and FFmpeg count it): what a gapless decoder skips at the start.
MP3_ENCODER_DELAY = 576
MP3_FRAME = 576  # samples in an MPEG-2 layer III frame (24 kHz)
MP3_FRAME_BYTES = 72 * MP3_BIT_RATE // SAMPLE_RATE  # bytes in one at MP3_BIT_RATE
MP3_STREAM_LEAD = MP3_ENCODER_DELAY + 529  # a stream's priming, as decoded
AAC_LEAD = 1024  # FFmpeg's aac encoder's priming: one frame


def _crc16(data: bytes) -> int:
    """CRC-16/ARC, the checksum of a LAME tag."""
    crc = 0
    for byte in data:
        crc ^= byte
        for _ in range(8):
            crc = (crc >> 1) ^ 0xA001 if crc & 1 else crc >> 1
    return crc


def write_whole(out, pieces, samples: int, fmt: str) -> None:
    """Write to `out` (a seekable binary file at its start) the bytes encode() makes of
    the audio `pieces` (float32 mono arrays, `samples` in all), one piece at a time:
    no whole copy of the audio or of the file in memory. The same bytes as encode()
    but for opus, whose Ogg stream serial is random in every file."""
    name = check_format(fmt)
    if name == "pcm" or (name == "wav" and 2 * samples <= 0xFFFFFFFF - 36):
        if name == "wav":  # the header with its sizes, as audio.encode writes it
            out.write(audio._wav_header(2 * samples, SAMPLE_RATE, 1))
        for pcm in pieces:
            out.write(audio.to_int16(audio._mono(pcm)).astype("<i2", copy=False).tobytes())
        return
    if name in ("wav", "flac"):  # libsndfile, fed block by block (the same bytes)
        container, subtype, _ = audio._CODECS[name]
        with sf.SoundFile(out, "w", SAMPLE_RATE, 1, subtype, format=container) as f:
            for pcm in pieces:
                f.write(audio.to_int16(audio._mono(pcm)))
        return
    enc = StreamEncoder(name)
    first = out.tell()
    if name == "mp3":  # room for the Info frame, written once the frames are counted
        out.write(bytes(MP3_FRAME_BYTES))
    head = enc.start()  # the first bytes of the frames (an mp3's Info frame copies them)
    out.write(head)
    for pcm in pieces:
        data = enc.push(pcm)
        head = (head + data[:4])[:4] if len(head) < 4 else head
        out.write(data)
    data = enc.end()
    head = (head + data[:4])[:4]
    out.write(data)
    if name != "mp3":
        return
    end = out.tell()
    frames = end - first - MP3_FRAME_BYTES
    info = _info_frame(head, frames, enc.samples)
    if info:
        out.seek(first)
        out.write(info)
        out.seek(end)
        return
    out.seek(first + MP3_FRAME_BYTES)  # no Info frame (no audio): the frames move up
    rest = out.read(frames)
    out.seek(first)
    out.write(rest)
    out.truncate()


def mp3_info_frame(frames_data: bytes, samples: int) -> bytes:
    """A silent first frame holding the Xing "Info" tag and LAME's tag for a whole
    constant-rate mp3 of `samples` samples: its frame count, encoder delay and end
    padding, from which FFmpeg (browsers, PyAV) and mpg123 (libsndfile) skip the
    codec's priming and padding, so the file decodes to exactly `samples`.
    b"" where the frames do not allow one (no audio)."""
    return _info_frame(frames_data[:4], len(frames_data), samples)


def _info_frame(head: bytes, length: int, samples: int) -> bytes:
    """mp3_info_frame of frames whose first 4 bytes are `head`, `length` bytes in all."""
    if len(head) < 4 or head[:2] != b"\xff\xf3":  # MPEG-2 layer III
        return b""
    size = MP3_FRAME_BYTES  # bytes in a frame (none needs padding)
    frames = length // size
    padding = frames * MP3_FRAME - MP3_ENCODER_DELAY - samples
    if samples <= 0 or length != frames * size or not 0 <= padding < 4096:
        return b""
    header = head[:2] + bytes([head[2] & ~0x02, head[3]])
    total = size + length
    tag = b"Info" + struct.pack(">III", 0x3, frames, total)  # flags: frames, bytes
    tag += b"LAME3.100".ljust(9, b"\0")  # the encoder (libmp3lame)
    tag += bytes([0x01, 0]) + bytes(8)  # revision 0, CBR; lowpass, ReplayGain: unset
    tag += bytes([0, MP3_BIT_RATE // 1000])  # flags and ATH; the bit rate
    tag += (MP3_ENCODER_DELAY << 12 | padding).to_bytes(3, "big")
    tag += bytes(4) + struct.pack(">IH", total, 0)  # misc, gain, preset; length, CRC
    body = header + bytes(9) + tag  # 9 bytes of (empty) side information: mono
    body += struct.pack(">H", _crc16(body))
    return body.ljust(size, b"\0")


class _Sink:
    """A write-only, non-seekable file for PyAV: what the muxer wrote since take()."""

    def __init__(self) -> None:
        self._buf = bytearray()

    def write(self, data) -> int:
        self._buf += data
        return len(data)

    def take(self) -> bytes:
        out = bytes(self._buf)
        self._buf.clear()
        return out


class StreamEncoder:
    """Encodes audio as it arrives. Use: start(), push() per chunk, end() once.

    Every format streams (`streams` is True): the bytes returned so far always
    form a playable prefix of the file.
    """

    streams = True

    def __init__(self, fmt: str):
        self.format = check_format(fmt)
        self.content_type = CONTENT_TYPES[self.format]
        self.inline = self.format in INLINE
        self.samples = 0  # samples pushed so far
        self._sink: _Sink | None = None
        self._container = None
        self._stream = None
        self._ended = False
        self._lock = threading.Lock()  # close() from the loop never races a push in a thread

    def start(self) -> bytes:
        if self.format == "wav":
            return audio.wav_header_for_stream()
        if self.format == "pcm":
            return b""
        import av  # PyAV: imported on first use (it loads FFmpeg's libraries)

        kind, codec, options, bit_rate = _FFMPEG[self.format]
        self._sink = _Sink()
        self._container = av.open(self._sink, "w", format=kind, options=options, buffer_size=4096)
        self._container.flags |= 0x0020  # AVFMT_FLAG_FLUSH_PACKETS: no bytes wait in the IO buffer
        self._stream = self._container.add_stream(codec, rate=SAMPLE_RATE)
        self._stream.layout = "mono"
        if bit_rate:
            self._stream.bit_rate = bit_rate
        self._container.start_encoding()
        return self._sink.take()

    def push(self, pcm: np.ndarray) -> bytes:
        x = audio._mono(pcm)
        self.samples += len(x)
        samples = audio.to_int16(x).astype("<i2")
        if self.format in INLINE:
            return samples.tobytes()
        if self._container is None:
            raise RuntimeError("StreamEncoder.push before start()")
        if len(samples) == 0:
            return b""
        import av

        frame = av.AudioFrame.from_ndarray(samples[None, :], format="s16", layout="mono")
        frame.sample_rate = SAMPLE_RATE
        with self._lock:
            if self._ended:
                return b""
            for packet in self._stream.encode(frame):
                self._container.mux(packet)
            return self._sink.take()

    def end(self) -> bytes:
        if self.format in INLINE or self._container is None:
            return b""
        with self._lock:
            if self._ended:
                return b""
            self._ended = True
            for packet in self._stream.encode(None):
                self._container.mux(packet)
            self._container.close()
            return self._sink.take()

    def close(self) -> None:
        """Free the encoder without finishing the file (the client went away)."""
        if self._container is None:
            return
        with self._lock:
            if self._ended:
                return
            self._ended = True
            try:
                self._container.close()
            except Exception:  # an unfinished file; nothing to keep
                pass
