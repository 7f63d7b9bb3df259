"""What of a run's log the `amlrun` CLI shows a terminal: the script's text, without what would drive the
terminal, and without the workspace's secrets."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from airflow_amlrun.run_log import MASK, masked, printable

# What a terminal acts on: C0 controls but tab, ESC among them, DEL and the C1 controls.
CONTROLS = {chr(c) for c in [*range(0x00, 0x09), *range(0x0A, 0x20), *range(0x7F, 0xA0)]}
TERMINAL_TEXT = st.text(
    alphabet=st.sampled_from(
        ["\x1b", "]", "[", "\x07", "\x9b", "\x9d", "\\", ";", "5", "2", "m", "a", "é", "\t"]
    )
)


@given(st.text() | TERMINAL_TEXT)
def test_printable_text_holds_no_control_but_tab(text: str) -> None:
    assert not CONTROLS & set(printable(text))


@given(st.text().map(printable))
def test_printable_text_is_left_as_it_is(text: str) -> None:
    assert printable(text) == text


def test_escape_sequences_go_whole_with_what_they_carry() -> None:
    assert printable("\x1b]52;c;Y3VybCBldmlsLnNo\x07copied") == "copied"
    assert printable("\x1b]0;title\x1b\\after") == "after"
    assert printable("\x1b[1;31mred\x1b[0m \x1b[2Jand\x9b2J\x9d0;t\x07 on") == "red and on"
    assert printable("progress 10%\r20%\t\x08done") == "progress 10%20%\tdone"


def test_every_secret_is_masked_the_longest_first() -> None:
    assert masked("user pw and pw-long", ["pw", "pw-long"]) == f"user {MASK} and {MASK}"
    assert masked("nothing here", ["", "absent"]) == "nothing here"
