"""Text from the edge made safe for a terminal.

Whatever the edge sends (a key's name, an error, a model's answer, a transcript) may
hold terminal control: ANSI escape sequences (colours, cursor moves, ``ESC [ 2 J`` to
clear the screen), OSC strings (``ESC ] 0 ;`` sets the window title, ``ESC ] 8 ;``
makes a hyperlink, ``ESC ] 52 ;`` writes the clipboard), their 8-bit C1 forms, and
bare control characters (BEL, backspace, carriage return). None of it reaches the
terminal: a whole sequence is dropped (not just its ESC, which would leave ``[2J``
behind), and any other C0 or C1 control character too. Multi-line text (chat answers,
transcripts, payloads) keeps its newlines and tabs; a single-line value (a table cell,
an error) has them as spaces.

TerminalFilter works on text that arrives in pieces (a streamed chat answer): a
sequence split between two pieces is still dropped whole, and nothing is held back,
so every printable character is written as soon as it arrives.
"""

from __future__ import annotations

ESC = "\x1b"
BEL = "\x07"
C1_CSI = "\x9b"
C1_ST = "\x9c"
C1_STRINGS = frozenset("\x90\x98\x9d\x9e\x9f")  # DCS, SOS, OSC, PM, APC
ESC_STRINGS = frozenset("P]X^_")  # ESC P (DCS), ESC ] (OSC), ESC X (SOS), ESC ^ (PM), ESC _ (APC)
# An unterminated control string stops swallowing text at a newline or after this many
# characters (a terminal would swallow the rest of the answer; a reader wants it).
MAX_STRING = 4096

_TEXT, _ESCAPE, _INTERMEDIATE, _CSI, _STRING, _STRING_ESCAPE = range(6)


def _control(char: str) -> bool:
    """C0 (but not the ones the caller keeps), DEL or C1."""
    code = ord(char)
    return code < 0x20 or 0x7F <= code <= 0x9F


class TerminalFilter:
    """Drops terminal control from text fed to it in pieces (see the module's doc)."""

    def __init__(self, *, multiline: bool = True) -> None:
        self.multiline = multiline
        self._state = _TEXT
        self._inside = 0  # characters of the control string being dropped

    def feed(self, text: str) -> str:
        """``text`` without terminal control (a sequence it ends may have begun earlier)."""
        kept: list[str] = []
        for char in text:
            self._take(char, kept)
        return "".join(kept)

    def _take(self, char: str, kept: list[str]) -> None:
        state = self._state
        if state == _ESCAPE:
            if char == "[":
                self._state = _CSI
            elif char in ESC_STRINGS:
                self._begin_string()
            elif " " <= char <= "/":
                self._state = _INTERMEDIATE
            elif "0" <= char <= "~":
                self._state = _TEXT  # a two-character sequence (ESC c, ESC 7, ...)
            elif char != ESC:
                self._state = _TEXT  # not a sequence after all: the ESC alone goes
                self._take(char, kept)
            return
        if state == _INTERMEDIATE:
            if "0" <= char <= "~":
                self._state = _TEXT
            elif not " " <= char <= "/":
                self._state = _TEXT
                self._take(char, kept)
            return
        if state == _CSI:
            if "@" <= char <= "~":
                self._state = _TEXT  # the final byte
            elif not " " <= char <= "?":
                self._state = _TEXT  # a broken sequence: what follows is text again
                self._take(char, kept)
            return
        if state == _STRING_ESCAPE:
            if char == "\\":
                self._state = _TEXT  # ESC \ (ST) ends the string
            else:
                self._state = _ESCAPE  # the string ended; a new sequence begins
                self._take(char, kept)
            return
        if state == _STRING:
            self._inside += 1
            if char in (BEL, C1_ST):
                self._state = _TEXT
            elif char == ESC:
                self._state = _STRING_ESCAPE
            elif char == "\n" or self._inside > MAX_STRING:
                self._state = _TEXT
                self._take(char, kept)
            return
        # _TEXT
        if char == ESC:
            self._state = _ESCAPE
        elif char == C1_CSI:
            self._state = _CSI
        elif char in C1_STRINGS:
            self._begin_string()
        elif char in "\n\t":
            kept.append(char if self.multiline else " ")
        elif char == "\r" and not self.multiline:
            kept.append(" ")
        elif not _control(char):
            kept.append(char)

    def _begin_string(self) -> None:
        self._state = _STRING
        self._inside = 0


def clean(text: str, *, multiline: bool = False) -> str:
    """``text`` without terminal control; newlines and tabs kept when ``multiline``,
    else spaces."""
    return TerminalFilter(multiline=multiline).feed(text)
