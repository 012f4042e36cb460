"""vibevoice_pool.voices: a real presets folder on disk."""

from __future__ import annotations

import io
import os

import numpy as np
import pytest
import soundfile as sf

from vibevoice_pool.audio import NotAudio, TooLarge
from vibevoice_pool.voices.library import (
    VoiceLibrary,
    VoiceNotFound,
    ensure_demo_voices,
    safe_voice_name,
)
from workers.wire.messages import SAMPLE_RATE, ErrorKind, PoolError


def tone(seconds=0.5, freq=200.0, rate=SAMPLE_RATE):
    t = np.arange(int(seconds * rate)) / rate
    return (0.3 * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def wav_bytes(pcm, rate=SAMPLE_RATE, fmt="WAV"):
    buf = io.BytesIO()
    sf.write(buf, pcm, rate, format=fmt)
    return buf.getvalue()


def bad_input(excinfo):
    err = excinfo.value
    assert isinstance(err, PoolError) and err.kind is ErrorKind.BAD_INPUT
    return err.message


@pytest.fixture
def folder(tmp_path):
    d = tmp_path / "voices"
    d.mkdir()
    (d / "en-Alice_woman.wav").write_bytes(wav_bytes(tone(0.5, 220)))
    (d / "en-Bob_man.flac").write_bytes(wav_bytes(tone(0.6, 110, 16000), rate=16000, fmt="FLAC"))
    (d / "zh-Xinran_woman.mp3").write_bytes(wav_bytes(tone(0.4, 300), fmt="MP3"))
    (d / "en-Carter_man.ogg").write_bytes(wav_bytes(tone(0.3, 150), fmt="OGG"))
    (d / "notes.txt").write_text("not a voice")
    (d / ".hidden.wav").write_bytes(wav_bytes(tone(0.1)))
    return d


@pytest.fixture
def lib(folder):
    return VoiceLibrary(folder, max_bytes=1_000_000, max_seconds=5.0)


def test_names_are_sorted_audio_files_only(lib):
    assert lib.names() == [
        "en-Alice_woman",
        "en-Bob_man",
        "en-Carter_man",
        "zh-Xinran_woman",
    ]


def test_resolve_exact_and_every_format(lib):
    alice = lib.resolve("en-Alice_woman")
    assert alice.dtype == np.float32 and len(alice) == SAMPLE_RATE // 2
    bob = lib.resolve("en-Bob_man")  # 16 kHz flac, resampled
    assert len(bob) == int(0.6 * SAMPLE_RATE)
    assert abs(len(lib.resolve("zh-Xinran_woman")) - int(0.4 * SAMPLE_RATE)) < 1200
    assert abs(len(lib.resolve("en-Carter_man")) - int(0.3 * SAMPLE_RATE)) < 1200


@pytest.mark.parametrize(
    "query,expected",
    [
        ("Alice", "en-Alice_woman"),  # short name
        ("alice", "en-Alice_woman"),  # any case
        ("EN-ALICE_WOMAN", "en-Alice_woman"),
        ("xinran", "zh-Xinran_woman"),
        ("Bob_m", "en-Bob_man"),  # contained in a preset name
        (
            "Speaker en-Carter_man (narrator)",
            "en-Carter_man",
        ),  # a preset name inside it
    ],
)
def test_partial_matching(lib, query, expected):
    assert lib.match(query) == expected
    assert np.array_equal(lib.resolve(query), lib.resolve(expected))


def test_unknown_voice_lists_available(lib):
    with pytest.raises(VoiceNotFound) as e:  # the API answers 404 voice_not_found
        lib.resolve("Zelda")
    msg = bad_input(e)
    assert "Zelda" in msg and "en-Alice_woman" in msg
    with pytest.raises(PoolError) as e:
        lib.resolve("")
    assert not isinstance(e.value, VoiceNotFound)  # no name at all is bad input (400)


def test_cache_is_used_and_invalidated_on_change(lib, folder):
    first = lib.resolve("Alice")
    assert lib.resolve("Alice") is first  # cached
    path = folder / "en-Alice_woman.wav"
    path.write_bytes(wav_bytes(tone(1.0, 220)))
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 5_000_000_000))
    second = lib.resolve("Alice")
    assert len(second) == SAMPLE_RATE and second is not first
    with pytest.raises(ValueError):
        second[0] = 1.0  # shared between requests: read-only


@pytest.mark.parametrize(
    "name",
    [
        "../etc/passwd",
        "..",
        "a/b",
        "..\\evil",
        "/abs",
        ".hidden",
        "nul\x00byte",
        "",
        "???",
    ],
)
def test_unsafe_names_rejected(lib, folder, name):
    before = sorted(os.listdir(folder.parent))
    with pytest.raises(PoolError) as e:
        lib.add(name, wav_bytes(tone()))
    bad_input(e)
    assert sorted(os.listdir(folder.parent)) == before


@pytest.mark.parametrize(
    "name,safe",
    [
        ("my voice", "my_voice"),
        ("en-Maria_woman.wav", "en-Maria_woman"),
        ("Zoë", "Zoe"),
        ("v1.2", "v1.2"),
        ("  trailing-. ", "trailing"),
    ],
)
def test_names_made_safe(name, safe):
    assert safe_voice_name(name) == safe


def test_add_then_resolve_and_delete(lib, folder):
    stereo = np.stack([tone(1.0, 180, 44100), tone(1.0, 180, 44100)], axis=1)
    name = lib.add("en-New voice", wav_bytes(stereo, rate=44100))
    assert name == "en-New_voice" and name in lib.names()
    stored = folder / "en-New_voice.wav"
    info = sf.info(str(stored))
    assert (info.samplerate, info.channels, info.subtype) == (SAMPLE_RATE, 1, "PCM_16")
    assert len(lib.resolve("New_voice")) == SAMPLE_RATE
    assert not [p for p in os.listdir(folder) if p.startswith(".tmp")]  # no temp left
    with pytest.raises(PoolError) as e:
        lib.add("en-new_voice", wav_bytes(tone()))  # taken (any case)
    assert "already exists" in bad_input(e) and "overwrite=true" in bad_input(e)
    lib.add("en-New_voice", wav_bytes(tone(2.0)), overwrite=True)
    assert len(lib.resolve("en-New_voice")) == 2 * SAMPLE_RATE
    lib.delete("en-New_voice")
    assert not stored.exists() and "en-New_voice" not in lib.names()
    with pytest.raises(PoolError) as e:
        lib.delete("en-New_voice")
    bad_input(e)


def test_add_validates_audio(lib, folder):
    with pytest.raises(NotAudio) as e:  # the API answers 415 unsupported_audio
        lib.add("junk", b"this is not audio" * 10)
    bad_input(e)
    with pytest.raises(TooLarge):
        lib.add("huge", b"\0" * 2_000_000)
    with pytest.raises(PoolError) as e:
        lib.add("long", wav_bytes(tone(6.0, rate=8000), rate=8000))
    assert "5 s" in bad_input(e) and not isinstance(e.value, NotAudio)  # audio, too long: 400
    assert lib.names() == [
        "en-Alice_woman",
        "en-Bob_man",
        "en-Carter_man",
        "zh-Xinran_woman",
    ]


def test_delete_never_leaves_the_folder(lib, folder):
    outside = folder.parent / "keep.wav"
    outside.write_bytes(wav_bytes(tone()))
    for name in ["../keep", "../keep.wav", "Alice", str(outside)]:
        with pytest.raises(PoolError):
            lib.delete(name)  # no partial matches, no paths
    assert outside.exists() and (folder / "en-Alice_woman.wav").exists()


def test_demo_voices_created_once(tmp_path):
    d = tmp_path / "presets"
    written = ensure_demo_voices(d)
    assert len(written) >= 3 and all(n.startswith("demo-") for n in written)
    lib = VoiceLibrary(d, max_bytes=10**7, max_seconds=30)
    assert lib.names() == sorted(written)
    for name in written:
        pcm = lib.resolve(name)
        assert 3 * SAMPLE_RATE <= len(pcm) <= 4 * SAMPLE_RATE
        assert 0.1 < np.max(np.abs(pcm)) <= 1.0
    assert not np.allclose(lib.resolve(written[0])[:1000], lib.resolve(written[1])[:1000])
    assert lib.match("Alice").startswith("demo-Alice")
    stamps = {p.name: p.stat().st_mtime_ns for p in d.iterdir()}
    assert ensure_demo_voices(d) == []
    assert {p.name: p.stat().st_mtime_ns for p in d.iterdir()} == stamps


def test_demo_voices_not_written_next_to_real_ones(folder):
    assert ensure_demo_voices(folder) == []
    assert not [p for p in os.listdir(folder) if p.startswith("demo-")]


def test_demo_voices_are_written_and_offered_only_for_synthetic_engines(tmp_path):
    from vibevoice_pool.voices.library import prepare_voices

    real_dir, tiny_dir = tmp_path / "real", tmp_path / "tiny"
    made, line = prepare_voices(real_dir, synthetic=False)
    assert made == [] and not list(real_dir.iterdir())
    assert "model's own voice" in line and str(real_dir) in line
    made, line = prepare_voices(tiny_dir, synthetic=True)
    assert len(made) == 4 and "synthetic demo voices" in line
    lib = VoiceLibrary(tiny_dir, max_bytes=10**7, max_seconds=60, offer_demo=False)
    assert lib.names() == []  # tones left by a tiny run are not offered to real weights
    with pytest.raises(PoolError):
        lib.resolve(made[0])
    assert prepare_voices(tiny_dir, synthetic=False)[1]  # still says: no presets
    assert VoiceLibrary(tiny_dir, max_bytes=10**7, max_seconds=60).names() == sorted(made)


def test_an_upload_never_answers_a_name_that_finds_a_preset(lib):
    with pytest.raises(PoolError) as e:  # "Carter" is how requests name en-Carter_man
        lib.add("carter", wav_bytes(tone()), owner="mallory")
    assert "en-Carter_man" in bad_input(e)
    lib.add("Bob_m-mine", wav_bytes(tone(0.7)), owner="mallory")  # short name "m": no preset's
    lib.add("0-Alice", wav_bytes(tone(0.9)), owner="mallory")  # short "Alice", sorts first
    assert lib.match("Alice") == "en-Alice_woman"  # the preset's short name
    assert lib.match("Bob_m") == "en-Bob_man"  # a part of both: the preset
    assert lib.match("bob_m-MINE") == "Bob_m-mine"  # its own name, any case
    assert lib.match("m-mine") == "Bob_m-mine"  # a part that finds no preset
    assert lib.presets() == ["en-Alice_woman", "en-Bob_man", "en-Carter_man", "zh-Xinran_woman"]


def test_a_quiet_upload_is_stored_without_losing_it_to_16_bits(lib):
    """The model hears every voice at -25 dBFS (microsoft's AudioNormalizer), so a quiet
    recording sent inline is heard whole; stored as a preset at its own level, 16 bits
    left a -60 dBFS float recording with noise 33 dB under the voice."""
    from vibevoice_pool.audio import decode_upload

    def heard(pcm):  # what the model's feature extractor makes of a sample
        pcm = pcm * (10 ** (-25 / 20) / (np.sqrt(np.mean(pcm**2)) + 1e-6))
        return pcm / (np.max(np.abs(pcm)) + 1e-6) if np.max(np.abs(pcm)) > 1 else pcm

    rng = np.random.RandomState(0)
    voice = tone(2.0, 170) * (0.5 + 0.5 * tone(2.0, 3) / 0.3) + 0.02 * rng.randn(2 * SAMPLE_RATE)
    quiet = (voice / np.max(np.abs(voice)) * 1e-3).astype(np.float32)  # peak -60 dBFS
    buf = io.BytesIO()
    sf.write(buf, quiet, SAMPLE_RATE, format="WAV", subtype="FLOAT")
    data = buf.getvalue()
    inline = heard(decode_upload(data, max_bytes=10**7, max_seconds=5.0))
    preset = heard(lib.resolve(lib.add("quiet one", data)))
    # the noise the preset adds (after matching the gain: the normaliser's eps makes the
    # quiet inline sample 0.3% softer)
    gain = np.dot(preset, inline) / np.dot(inline, inline)
    noise_db = 20 * np.log10(np.std(preset - gain * inline) / np.std(inline))
    assert noise_db < -80, f"the stored preset carries noise {noise_db:.1f} dB under the voice"


def test_a_damaged_owners_file_is_said_and_kept_aside_not_overwritten(lib, folder, caplog):
    """A voices' owners file cut short (a disk fault, a copy taken mid-write) or in
    another layout was read as "no owners" without a word, and the next upload wrote
    a new one over it: who had uploaded what was lost for good. It is now said once
    (naming the file), and the next write keeps the damaged file aside first."""
    lib.add("mine", wav_bytes(tone()), owner="alice")
    lib.add("theirs", wav_bytes(tone(0.7)), owner="bob")
    owners = folder / ".owners.json"
    whole = owners.read_bytes()
    owners.write_bytes(whole[: len(whole) // 2])  # cut short
    with caplog.at_level("WARNING", logger="vibevoice_pool"):
        assert lib.owner("mine") is None and "mine" in lib.presets()  # nothing to go by
        assert lib.owner("theirs") is None  # read once: one line for this state
    said = [r.getMessage() for r in caplog.records if "owners file" in r.getMessage()]
    assert len(said) == 1 and str(owners) in said[0] and "damaged" in said[0], said
    lib.add("later", wav_bytes(tone(0.8)), owner="carol")
    kept = sorted(folder.glob(".owners.json.damaged-*"))
    assert len(kept) == 1 and kept[0].read_bytes() == whole[: len(whole) // 2]
    assert lib.owner("later") == "carol"
    owners.write_text('{"mine": {"owner": "alice"}}')  # another layout: damaged too
    with caplog.at_level("WARNING", logger="vibevoice_pool"):
        assert lib.owner("mine") is None
    assert sum("owners file" in r.getMessage() for r in caplog.records) == 2
