"""`vibevoice-pool synth`: the format it writes, from --format or -o's extension."""

from __future__ import annotations

import pytest

from vibevoice_pool.cli import parser
from vibevoice_pool.client import output_format
from vibevoice_pool.jobs.client import body_from_args


@pytest.mark.parametrize(
    "output, fmt",
    [
        ("out.wav", "wav"),
        ("out.mp3", "mp3"),
        ("OUT.FLAC", "flac"),
        ("out.ogg", "opus"),
        ("out.opus", "opus"),
        ("out.aac", "aac"),
        ("out.pcm", "pcm"),
        ("out", "wav"),
        ("out.txt", "wav"),
    ],
)
def test_without_format_the_output_extension_picks_it(output, fmt):
    """A WAV was written into out.mp3 and out.flac (the default was wav whatever -o said)."""
    assert output_format(None, output) == fmt


def test_an_explicit_format_wins_over_the_extension():
    assert output_format(" MP3 ", "out.wav") == "mp3"


def test_synth_flags_and_the_async_body_follow_the_extension(tmp_path):
    script = tmp_path / "s.txt"
    script.write_text("Speaker 1: Hi.", encoding="utf-8")
    out = tmp_path / "out.mp3"
    ns = parser().parse_args(["synth", "--script", str(script), "-o", str(out), "--async"])
    assert ns.format is None
    assert body_from_args(ns)["format"] == "mp3"
