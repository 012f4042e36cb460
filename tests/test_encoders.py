"""vibevoice_pool.encoders: every format streams (bytes after the first chunk,
a playable prefix at every point), the whole stream decodes to the audio sent,
and an encoder closed mid-stream (a client gone) is freed safely."""

from __future__ import annotations

import io
import threading
import wave

import av
import numpy as np
import pytest
import soundfile as sf

from vibevoice_pool.audio import wav_header_for_stream
from vibevoice_pool.encoders import SUPPORTED_FORMATS, StreamEncoder, check_format, encode
from workers.wire.messages import SAMPLE_RATE, PoolError

CODECS = ["mp3", "opus", "aac", "flac"]
AV_FORMAT = {"mp3": "mp3", "opus": "ogg", "aac": "aac", "flac": "flac", "wav": "wav"}


def tone(seconds: float, freq: float = 330.0) -> np.ndarray:
    t = np.arange(int(seconds * SAMPLE_RATE)) / SAMPLE_RATE
    return (0.4 * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def decoded_seconds(data: bytes, fmt: str) -> float:
    with av.open(io.BytesIO(data), format=AV_FORMAT[fmt]) as c:
        frames = list(c.decode(audio=0))
    samples = sum(f.samples for f in frames)
    peak = max(float(np.abs(f.to_ndarray()).max()) for f in frames)
    assert peak > 0.1  # the tone, not silence
    return samples / frames[0].sample_rate


@pytest.mark.parametrize("fmt", CODECS + ["wav"])
def test_each_chunk_gives_bytes_at_once_and_the_stream_decodes_whole(fmt):
    enc = StreamEncoder(fmt)
    assert enc.streams and enc.content_type.startswith("audio/")
    parts = [enc.start()]
    for _ in range(6):  # 3 s in chunks of 0.5 s, as a worker sends them
        part = enc.push(tone(0.5))
        assert len(part) > 200, f"{fmt}: a 0.5 s chunk gave only {len(part)} bytes"
        parts.append(part)
    prefix = b"".join(parts)
    assert decoded_seconds(prefix, fmt) > 2.3  # what arrived so far already plays
    parts.append(enc.end())
    assert enc.end() == b""  # once
    assert enc.samples == 6 * SAMPLE_RATE // 2
    assert decoded_seconds(b"".join(parts), fmt) == pytest.approx(3.0, abs=0.1)


def test_pcm_is_raw_16_bit_samples():
    enc = StreamEncoder("pcm")
    assert enc.start() == b"" and len(enc.push(tone(0.25))) == SAMPLE_RATE // 2
    assert enc.end() == b""


def test_whole_aac_file_decodes():
    data, ctype = encode(tone(1.5), "aac")
    assert ctype == "audio/aac" and data[:2] == b"\xff\xf1"  # an ADTS frame
    assert decoded_seconds(data, "aac") == pytest.approx(1.5, abs=0.1)


def test_closing_mid_stream_while_a_push_runs_in_a_thread():
    for fmt in CODECS:
        enc = StreamEncoder(fmt)
        enc.start()
        enc.push(tone(0.5))
        pushing = threading.Thread(target=lambda e=enc: [e.push(tone(0.5)) for _ in range(20)])
        pushing.start()
        enc.close()  # the client went away: frees the encoder, never corrupts it
        pushing.join(10)
        assert not pushing.is_alive()
        assert enc.push(tone(0.5)) == b"" and enc.end() == b""
        enc.close()


def test_formats_are_checked_and_listed():
    assert check_format(" MP3 ") == "mp3"
    with pytest.raises(PoolError) as err:
        StreamEncoder("vorbis")
    assert all(f in err.value.message for f in SUPPORTED_FORMATS)


def test_streamed_wav_reads_back_exactly_with_unknown_length():
    enc = StreamEncoder("wav")
    chunks = [tone(0.3, freq=220), tone(0.2, freq=330), tone(0.1)]
    body = enc.start() + b"".join(enc.push(c) for c in chunks) + enc.end()
    assert body.startswith(wav_header_for_stream()) and enc.content_type == "audio/wav"
    back, rate = sf.read(io.BytesIO(body), dtype="float32")
    assert rate == SAMPLE_RATE and len(back) == enc.samples == sum(map(len, chunks))
    assert np.max(np.abs(back - np.concatenate(chunks))) < 1e-3
    with wave.open(io.BytesIO(body)) as w:  # the stdlib reader copes too
        assert w.getframerate() == SAMPLE_RATE and w.getsampwidth() == 2
        assert len(w.readframes(10**9)) == 2 * enc.samples


def test_a_whole_opus_file_ends_with_the_audio_sent():
    # libsndfile's Ogg Opus writer left the encoder's look-ahead unflushed: the last
    # 4 ms of a whole file decoded as noise (errors of 0.3 on a 0.4 tone)
    data, ctype = encode(tone(1.0, freq=440), "opus")
    assert ctype == "audio/ogg"
    with av.open(io.BytesIO(data), format="ogg") as c:
        frames = list(c.decode(audio=0))
    rate = frames[0].sample_rate  # 48 kHz, as every Opus decoder gives
    out = np.concatenate([f.to_ndarray().reshape(-1) for f in frames])
    assert len(out) == rate  # one second, no more, no less
    want = 0.4 * np.sin(2 * np.pi * 440 * np.arange(len(out)) / rate)
    middle = slice(rate // 2, rate // 2 + rate // 20)
    assert np.max(np.abs(out[middle] - want[middle])) < 0.05  # (the decoder is aligned)
    tail = slice(len(out) - rate // 200, len(out))  # the last 5 ms
    assert np.max(np.abs(out[tail] - want[tail])) < 0.05


def speechlike(seconds: float) -> np.ndarray:
    """Voiced harmonics with a gliding pitch, noise (the sibilants) and syllables of
    about 0.25 s with gaps: content that asks a codec for bits, as speech does."""
    t = np.arange(int(seconds * SAMPLE_RATE)) / SAMPLE_RATE
    pitch = 2 * np.pi * np.cumsum(140 + 40 * np.sin(2 * np.pi * 0.7 * t)) / SAMPLE_RATE
    voiced = sum(np.sin(k * pitch) / k for k in range(1, 30))
    noise = np.random.default_rng(7).standard_normal(len(t))
    syllables = np.clip(np.sin(2 * np.pi * 2 * t), 0, None)
    return (syllables * (0.15 * voiced + 0.08 * noise)).astype(np.float32)


def streamed(pcm: np.ndarray, fmt: str) -> bytes:
    enc = StreamEncoder(fmt)
    parts = [enc.start()]
    parts += [enc.push(pcm[i : i + SAMPLE_RATE // 2]) for i in range(0, len(pcm), SAMPLE_RATE // 2)]
    return b"".join(parts) + enc.end()


def test_opus_is_coded_at_a_bit_rate_for_speech_whole_and_streamed():
    # FFmpeg's libopus default (64 kb/s for one channel) made files twice the size
    # they were; 32 kb/s is the top of RFC 6716's range for full-band speech
    pcm = speechlike(10.0)
    for data in (encode(pcm, "opus")[0], streamed(pcm, "opus")):
        kbps = len(data) * 8 / 10.0 / 1000
        assert 20 < kbps < 36, f"{kbps:.1f} kb/s"
        back, rate = sf.read(io.BytesIO(data), dtype="float32")
        assert rate == SAMPLE_RATE and len(back) == len(pcm)  # the same length as made
        assert decoded_seconds(data, "opus") == 10.0  # PyAV: 48 kHz, the same length


def _spectrum_top(pcm: np.ndarray) -> float:
    """The highest frequency still within 10 dB of the 1-2 kHz level."""
    power = np.convolve(np.abs(np.fft.rfft(pcm)) ** 2, np.ones(200) / 200, "same")
    freq = np.fft.rfftfreq(len(pcm), 1 / SAMPLE_RATE)
    ref = power[(freq > 1000) & (freq < 2000)].mean()
    return float(freq[np.nonzero(power > 0.1 * ref)[0].max()])


def test_mp3_whole_and_streamed_agree_and_the_whole_file_is_gapless():
    # A stream was LAME's default (32 kb/s, low-passed at ~8 kHz), a whole file
    # libsndfile's VBR; both are now 48 kb/s. The whole file's LAME tag says its
    # frames, delay and padding: it decodes to the samples made, in time.
    pcm = speechlike(6.0) + 0.05 * np.random.default_rng(3).standard_normal(6 * SAMPLE_RATE)
    pcm = pcm.astype(np.float32)
    whole, ctype = encode(pcm, "mp3")
    stream = streamed(pcm, "mp3")
    assert ctype == "audio/mpeg" and whole[13:17] == b"Info"
    for data in (whole, stream):
        assert 46 < len(data) * 8 / 6.0 / 1000 < 50  # kb/s, constant
    assert abs(len(whole) - len(stream)) <= 144  # the tag's one frame
    back, rate = sf.read(io.BytesIO(whole), dtype="float32")  # libsndfile: mpg123
    assert rate == SAMPLE_RATE and len(back) == len(pcm)
    with av.open(io.BytesIO(whole), format="mp3") as c:
        out = np.concatenate([f.to_ndarray().reshape(-1) for f in c.decode(audio=0)])
    assert len(out) == len(pcm)
    assert np.corrcoef(out, pcm)[0, 1] > 0.9  # in time: not shifted by the priming
    assert _spectrum_top(out) > 10_000  # the band above 8 kHz is kept
    assert encode(np.zeros(0, np.float32), "mp3")[0][13:17] != b"Info"


@pytest.mark.parametrize("fmt, lead, frame", [("mp3", 1105, 576), ("aac", 1024, 1024)])
def test_a_streamed_mp3_or_aac_decodes_its_priming_first_as_documented(fmt, lead, frame):
    """Neither stream can carry its length (encoders' docstring): what a client
    decodes is the codec's priming, the audio, then less than a frame of padding."""
    from vibevoice_pool.encoders import AAC_LEAD, MP3_STREAM_LEAD

    assert {"mp3": MP3_STREAM_LEAD, "aac": AAC_LEAD}[fmt] == lead
    for seconds in (3.0, 10.37):
        pcm = speechlike(seconds)
        with av.open(io.BytesIO(streamed(pcm, fmt)), format=AV_FORMAT[fmt]) as c:
            out = np.concatenate([f.to_ndarray().reshape(-1) for f in c.decode(audio=0)])
        assert lead <= len(out) - len(pcm) <= lead + frame
        shift = np.correlate(out[: 2 * SAMPLE_RATE], pcm[:SAMPLE_RATE], "valid")
        assert int(np.argmax(shift)) == lead  # the audio starts after the priming


def _ogg_pages_without_serial(data: bytes) -> bytes:
    """An Ogg stream with each page's serial number and checksum zeroed (FFmpeg picks a
    random serial for every file, so two encodes of one audio differ there alone)."""
    out, i = bytearray(data), 0
    while i < len(out):
        assert out[i : i + 4] == b"OggS"
        segments = out[i + 26]
        size = 27 + segments + sum(out[i + 27 : i + 27 + segments])
        out[i + 14 : i + 18] = out[i + 22 : i + 26] = bytes(4)
        i += size
    return bytes(out)


@pytest.mark.parametrize("fmt", SUPPORTED_FORMATS)
@pytest.mark.parametrize("samples", [0, 100, 3200, 7 * SAMPLE_RATE + 123])
def test_a_whole_file_written_piece_by_piece_is_the_file_encode_makes(fmt, samples):
    """write_whole (a job's result, its audio read from disk in pieces) writes the bytes
    encode() makes of all the audio at once; an mp3's Info frame, which counts the
    frames, is written in front once they are."""
    from vibevoice_pool.encoders import write_whole

    pcm = (np.random.default_rng(samples).standard_normal(samples) * 0.2).astype(np.float32)
    whole, _ = encode(pcm, fmt)
    out = io.BytesIO()
    write_whole(out, (pcm[i : i + 777] for i in range(0, samples, 777)), samples, fmt)
    if fmt == "opus":
        assert _ogg_pages_without_serial(out.getvalue()) == _ogg_pages_without_serial(whole)
    else:
        assert out.getvalue() == whole
