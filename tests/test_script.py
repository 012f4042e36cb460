"""Script parsing: numbering, rotation, limits, messages that name the line."""

import pytest

from vibevoice_pool.script import parse_script
from workers.wire.messages import PoolError, Turn


def test_one_based_numbering():
    assert parse_script("Speaker 1: Hi\nSpeaker 2: Hello") == (Turn(0, "Hi"), Turn(1, "Hello"))


def test_zero_based_numbering_when_speaker_0_appears():
    assert parse_script("Speaker 0: Hi\nSpeaker 3: Yo") == (Turn(0, "Hi"), Turn(3, "Yo"))


def test_unprefixed_lines_rotate_through_the_speakers():
    turns = parse_script("one\ntwo\nthree", num_speakers=2)
    assert [t.speaker for t in turns] == [0, 1, 0]
    assert [t.speaker for t in parse_script("a\nb")] == [0, 0]
    # Speaker 1 and Speaker 3 named: the script has three speakers, Speaker 2 among them
    turns = parse_script("Speaker 1: hi\nSpeaker 3: yo\nx\ny\nz")
    assert [t.speaker for t in turns] == [0, 2, 0, 1, 2]


@pytest.mark.parametrize(
    "text, words",
    [
        ("", "empty"),
        ("   \n ", "empty"),
        ("Speaker 5: too many", "line 1.*1-4"),
        ("Speaker 1: ok\nSpeaker 0: a\nSpeaker 4: five", "line 3.*0-3"),
        ("Speaker 1: ok\nSpeaker 2:", "line 2.*says nothing"),
        ("Speaker 1: \u200b\u2060", "line 1.*says nothing"),  # invisible characters only
        ("\u200b\n\u2060 \u00ad", "empty"),
    ],
)
def test_bad_scripts_say_what_and_where(text, words):
    with pytest.raises(PoolError, match=words) as e:
        parse_script(text)
    assert e.value.kind.value == "bad_input"


def test_length_limit():
    with pytest.raises(PoolError, match="limit is 10"):
        parse_script("Speaker 1: " + "x" * 20, max_chars=10)
    # the limit itself is allowed, one character more is not
    assert parse_script("Speaker 1: " + "x" * 9, max_chars=20) == (Turn(0, "x" * 9),)
    with pytest.raises(PoolError, match="has 21 characters; the limit is 20"):
        parse_script("Speaker 1: " + "x" * 10, max_chars=20)


def test_five_speakers_for_rotation_is_refused():
    with pytest.raises(PoolError, match="at most 4"):
        parse_script("a\nb", num_speakers=5)


def test_a_byte_order_mark_is_not_part_of_the_first_line():
    """A script file saved as "UTF-8 with BOM" (read by `synth --script`, pasted, or
    sent as JSON) keeps its first line's speaker, and the mark is not spoken."""
    script = "\ufeffSpeaker 2: Hi\r\nSpeaker 1: Yo\r\n"
    assert parse_script(script) == (Turn(1, "Hi"), Turn(0, "Yo"))
    assert parse_script("\ufeffHello") == (Turn(0, "Hello"),)
    with pytest.raises(PoolError, match="empty"):
        parse_script("\ufeff \n\ufeff")
    with pytest.raises(PoolError, match="says nothing"):
        parse_script("Speaker 1: \ufeff")


def test_invisible_characters_at_a_lines_ends_are_not_part_of_it():
    script = "\u200bSpeaker 2: Hi\u2060\n\u200b\nSpeaker 1: Yo"
    assert parse_script(script) == (Turn(1, "Hi"), Turn(0, "Yo"))
    # inside a turn they stay (a zero-width joiner binds an emoji sequence)
    assert parse_script("Speaker 1: a\u200db") == (Turn(0, "a\u200db"),)
