"""Server-sent events from a byte stream: `SSEParser.feed(bytes)` returns the data of each event completed by
those bytes. Chunk boundaries fall anywhere (inside a line, inside a CRLF); comments and fields other than
`data` are skipped; an event's several data lines are joined with newlines, as the SSE spec says."""

from __future__ import annotations


class SSEParser:
    def __init__(self) -> None:
        self._buf = b""
        self._data: list[str] = []

    def feed(self, chunk: bytes) -> list[str]:
        self._buf += chunk
        events = []
        while True:
            i = self._buf.find(b"\n")
            if i < 0:
                break
            line, self._buf = self._buf[:i], self._buf[i + 1 :]
            if line.endswith(b"\r"):
                line = line[:-1]
            if not line:  # a blank line ends the event
                if self._data:
                    events.append("\n".join(self._data))
                    self._data = []
                continue
            name, _, value = line.decode("utf-8", errors="replace").partition(":")
            if name == "data":
                self._data.append(value[1:] if value.startswith(" ") else value)
        return events

    def close(self) -> list[str]:
        """The event the stream ended inside, if its data was complete lines (a server that omits the last
        blank line)."""
        rest = self.feed(b"\n") if self._buf else []
        if self._data:
            rest.append("\n".join(self._data))
            self._data = []
        return rest
