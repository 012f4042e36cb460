"""vibevoice_pool.audio: decoding uploads and encoding responses, for real."""

from __future__ import annotations

import base64
import io

import numpy as np
import pytest
import soundfile as sf

from vibevoice_pool.audio import (
    SUPPORTED_FORMATS,
    TooLarge,
    decode_base64_upload,
    decode_upload,
    encode,
    to_int16,
    wav_header_for_stream,
)
from workers.wire.messages import SAMPLE_RATE, ErrorKind, PoolError

LIMITS = {"max_bytes": 2_000_000, "max_seconds": 10.0}


def tone(seconds=1.0, rate=SAMPLE_RATE, freq=440.0, amp=0.5):
    t = np.arange(int(seconds * rate)) / rate
    return (amp * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def file_bytes(pcm, rate, fmt, subtype=None):
    buf = io.BytesIO()
    sf.write(buf, pcm, rate, format=fmt, subtype=subtype)
    return buf.getvalue()


def bad_input(excinfo):
    err = excinfo.value
    assert isinstance(err, PoolError) and err.kind is ErrorKind.BAD_INPUT
    return err.message


# ---- encode ----------------------------------------------------------------


@pytest.mark.parametrize("fmt", SUPPORTED_FORMATS)
def test_encode_round_trip_every_format(fmt):
    pcm = tone(1.0)
    data, ctype = encode(pcm, fmt)
    assert ctype.startswith("audio/") and data
    if fmt == "pcm":
        back = np.frombuffer(data, "<i2").astype(np.float32) / 32767
    else:
        back, rate = sf.read(io.BytesIO(data), dtype="float32")
        assert rate == SAMPLE_RATE and back.ndim == 1
    assert abs(len(back) - len(pcm)) <= 0.05 * SAMPLE_RATE
    n = min(len(back), len(pcm))
    # Same loudness, and (for everything but the lossy codecs) the same samples.
    assert np.sqrt(np.mean(back[:n] ** 2)) == pytest.approx(np.sqrt(np.mean(pcm**2)), rel=0.1)
    if fmt in ("wav", "flac", "pcm"):
        assert len(back) == len(pcm)
        assert np.max(np.abs(back - pcm)) < 1e-3
    # And what we encode, we accept as an upload.
    if fmt != "pcm":
        again = decode_upload(data, **LIMITS)
        assert abs(len(again) - len(pcm)) <= 0.05 * SAMPLE_RATE


def test_encode_headers_and_content_types():
    pcm = tone(0.2)
    assert encode(pcm, "wav")[0][:4] == b"RIFF"
    assert encode(pcm, "flac")[0][:4] == b"fLaC"
    opus, ctype = encode(pcm, "opus")
    assert opus[:4] == b"OggS" and b"OpusHead" in opus[:200] and ctype == "audio/ogg"
    assert encode(pcm, "mp3")[1] == "audio/mpeg"
    assert len(encode(pcm, "pcm")[0]) == 2 * len(pcm)
    assert encode(pcm, " WAV ")[1] == "audio/wav"  # case and spaces forgiven


def test_encode_unsupported_format_lists_supported():
    with pytest.raises(PoolError) as e:
        encode(tone(0.1), "aac")
    msg = bad_input(e)
    assert "aac" in msg and all(f in msg for f in SUPPORTED_FORMATS)


def test_to_int16_clips_and_rounds():
    out = to_int16(np.array([0.0, 0.5, -0.5, 1.0, -1.0, 3.0, -3.0, np.nan], np.float32))
    assert out.dtype == np.int16
    assert out.tolist() == [0, 16384, -16384, 32767, -32767, 32767, -32767, 0]


def test_encode_clips_loud_input():
    data, _ = encode(np.array([2.0, -2.0, 0.25], np.float32), "wav")
    back, _ = sf.read(io.BytesIO(data), dtype="int16")
    assert back.tolist() == [32767, -32767, 8192]


# ---- decode ----------------------------------------------------------------


@pytest.mark.parametrize(
    "fmt,subtype", [("WAV", "PCM_16"), ("FLAC", None), ("MP3", None), ("OGG", "VORBIS")]
)
def test_decode_stereo_44k1_becomes_mono_24k(fmt, subtype):
    left, right = tone(2.0, rate=44100, amp=0.6), tone(2.0, rate=44100, amp=0.2)
    data = file_bytes(np.stack([left, right], axis=1), 44100, fmt, subtype)
    out = decode_upload(data, **LIMITS)
    assert out.dtype == np.float32 and out.ndim == 1
    assert abs(len(out) - 2 * SAMPLE_RATE) <= (0 if fmt in ("WAV", "FLAC") else 0.05 * SAMPLE_RATE)
    assert np.max(np.abs(out)) <= 1.0
    # mono is the mean: a 440 Hz tone of amplitude 0.4
    mid = out[SAMPLE_RATE // 2 : SAMPLE_RATE]
    assert np.sqrt(np.mean(mid**2)) == pytest.approx(0.4 / np.sqrt(2), rel=0.1)


def test_decode_float_wav_over_full_scale_is_scaled_not_clipped():
    """A float file above 0 dBFS keeps its waveform (the engine normalises the level to
    -25 dBFS anyway); clipped, a tone of amplitude 4 came out a square wave."""
    data = file_bytes(np.array([0.0, 1.5, -2.0, 0.5] * 100, np.float32), 24000, "WAV", "FLOAT")
    out = decode_upload(data, **LIMITS)
    np.testing.assert_allclose(out[:4], [0.0, 0.75, -1.0, 0.25], atol=1e-6)
    loud = decode_upload(file_bytes(tone(1.0, amp=4.0), 24000, "WAV", "FLOAT"), **LIMITS)
    assert np.max(np.abs(loud)) == pytest.approx(1.0, abs=1e-6)
    np.testing.assert_allclose(loud, tone(1.0, amp=4.0) / 4.0, atol=1e-5)
    assert np.mean(np.abs(loud) > 0.99) < 0.1  # not a square wave


@pytest.mark.parametrize("n", [1, 3])
def test_decode_a_few_samples_at_a_high_rate_is_bad_input_not_a_crash(n):
    """Too few samples to leave one after resampling to 24 kHz: a ValueError from
    np.concatenate escaped as 500 internal_error."""
    data = file_bytes(np.full(n, 0.3, np.float32), 192_000, "WAV", "FLOAT")
    with pytest.raises(PoolError) as e:
        decode_upload(data, **LIMITS)
    assert "no audio samples" in bad_input(e)


@pytest.mark.parametrize(
    "data",
    [b"hello, this is plainly text and not audio at all\n" * 20, bytes(range(256)) * 8],
    ids=["text", "binary"],
)
def test_decode_rejects_non_audio(data):
    with pytest.raises(PoolError) as e:
        decode_upload(data, **LIMITS)
    assert "could not be read as audio" in bad_input(e)


def test_decode_rejects_corrupt_flac():
    data = bytearray(file_bytes(tone(1.0), 24000, "FLAC"))
    data[4:60] = b"\xff" * 56  # clobber the stream info block
    with pytest.raises(PoolError) as e:
        decode_upload(bytes(data), **LIMITS)
    bad_input(e)


def test_decode_rejects_empty_and_silent_files():
    with pytest.raises(PoolError) as e:
        decode_upload(b"", **LIMITS)
    assert "empty" in bad_input(e)
    with pytest.raises(PoolError) as e:
        decode_upload(file_bytes(np.zeros(0, np.float32), 24000, "WAV", "PCM_16"), **LIMITS)
    assert "no audio" in bad_input(e)


def test_decode_rejects_oversized_upload_as_too_large():
    data = file_bytes(tone(1.0), 24000, "WAV", "PCM_16")  # 48 KB
    with pytest.raises(TooLarge) as e:
        decode_upload(data, max_bytes=10 * 1024, max_seconds=60)
    msg = bad_input(e)
    assert "46.9 KB" in msg and "10 KB" in msg


def test_decode_rejects_overlong_upload():
    data = file_bytes(tone(3.0, rate=8000), 8000, "FLAC")
    with pytest.raises(PoolError) as e:
        decode_upload(data, max_bytes=10**7, max_seconds=2.0)
    assert not isinstance(e.value, TooLarge)
    msg = bad_input(e)
    assert "3 s" in msg and "2 s" in msg


def test_decode_rejects_overlong_stream_without_known_length():
    body = wav_header_for_stream(8000) + to_int16(tone(3.0, rate=8000)).tobytes()
    with pytest.raises(PoolError) as e:
        decode_upload(body, max_bytes=10**7, max_seconds=2.0)
    assert "2 s" in bad_input(e)


def test_decode_base64_and_data_url():
    raw = file_bytes(tone(0.5), 24000, "WAV", "PCM_16")
    text = base64.b64encode(raw).decode()
    assert len(decode_base64_upload(text, **LIMITS)) == SAMPLE_RATE // 2
    wrapped = "data:audio/wav;base64," + "\n".join(text[i : i + 76] for i in range(0, 999, 76))
    wrapped += text[999:]
    assert len(decode_base64_upload(wrapped, **LIMITS)) == SAMPLE_RATE // 2


@pytest.mark.parametrize("text", ["not base64 at all!", "QUJD$$==", "", "   "])
def test_decode_base64_rejects_invalid(text):
    with pytest.raises(PoolError) as e:
        decode_base64_upload(text, **LIMITS, what="speakers[0].audio")
    assert "speakers[0].audio" in bad_input(e)


def test_decode_base64_too_large_before_decoding():
    text = base64.b64encode(b"\0" * 50_000).decode()
    with pytest.raises(TooLarge):
        decode_base64_upload(text, max_bytes=1000, max_seconds=10)


@pytest.mark.parametrize("fill", [0.0, np.nan, 1e-6])
def test_a_silent_voice_sample_is_refused(fill):
    """Nothing to clone: all zeros, all NaN (decoded as silence), or quieter than one step
    of 16-bit audio (stored as a 16-bit WAV, an upload became all zeros)."""
    buf = io.BytesIO()
    sf.write(buf, np.full(24000, fill, np.float32), 24000, format="WAV", subtype="FLOAT")
    with pytest.raises(PoolError, match="is silent") as e:
        decode_upload(buf.getvalue(), **LIMITS)
    assert e.value.kind is ErrorKind.BAD_INPUT
