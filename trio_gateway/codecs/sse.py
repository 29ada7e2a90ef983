"""Server-Sent Events, sans-IO (WHATWG HTML §9.2 "event stream interpretation").

Strategy: ``SSEDecoder.feed(data)`` appends to a buffer and consumes every *complete* line;
a blank line dispatches the event being built. Lines may end in CRLF, LF or CR; a CR at the end
of a chunk is held back until the next byte shows whether an LF follows. Nothing here blocks or
does I/O; the caller decides where bytes come from. Caps protect the gateway against an upstream
that never sends a newline or grows one event without bound: the decoder raises ``SSEError``.

``encode_event`` is the other direction: one ``data:`` event (JSON text is single-line, so no
splitting is needed there), or a comment line used as a keep-alive.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["SSEDecoder", "SSEError", "SSEEvent", "encode_comment", "encode_data"]

DEFAULT_MAX_LINE = 1 << 20  # 1 MiB: a single JSON chunk from a provider is far smaller
DEFAULT_MAX_EVENT = 8 << 20


class SSEError(ValueError):
    """The byte stream cannot be an event stream we are willing to hold."""


@dataclass(frozen=True, slots=True)
class SSEEvent:
    event: str
    data: str
    id: str | None = None


class SSEDecoder:
    def __init__(
        self, *, max_line: int = DEFAULT_MAX_LINE, max_event: int = DEFAULT_MAX_EVENT
    ) -> None:
        self._buf = bytearray()
        self._max_line = max_line
        self._max_event = max_event
        self._event = ""
        self._data: list[str] = []
        self._data_len = 0
        self._last_id: str | None = None
        self._bom_checked = False

    def feed(self, data: bytes) -> list[SSEEvent]:
        """Consume ``data``; return the events it completed (possibly none)."""
        self._buf += data
        if not self._bom_checked:
            if len(self._buf) < 3 and b"\xef\xbb\xbf".startswith(bytes(self._buf)):
                return []
            if self._buf.startswith(b"\xef\xbb\xbf"):
                del self._buf[:3]
            self._bom_checked = True
        events: list[SSEEvent] = []
        start = 0
        buf = self._buf
        n = len(buf)
        while start < n:
            lf = buf.find(b"\n", start)
            cr = buf.find(b"\r", start, lf if lf >= 0 else n)
            if cr >= 0:
                if cr + 1 == n:  # CR at the end of what we have: wait to see if LF follows
                    break
                end, nxt = cr, cr + 2 if buf[cr + 1] == 0x0A else cr + 1
            elif lf >= 0:
                end, nxt = lf, lf + 1
            else:
                break
            ev = self._line(bytes(buf[start:end]))
            if ev is not None:
                events.append(ev)
            start = nxt
        del buf[:start]
        if len(buf) > self._max_line:
            raise SSEError(f"SSE line longer than {self._max_line} bytes")
        return events

    def close(self) -> None:
        """End of stream. A trailing event without its blank line is discarded, as the spec says;
        a partial line is an error only if it carries data we would otherwise silently drop."""
        if self._buf.strip():
            raise SSEError("stream ended inside an SSE line")

    def _line(self, raw: bytes) -> SSEEvent | None:
        if not raw:
            return self._dispatch()
        if raw[0] == 0x3A:  # ':' comment
            return None
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise SSEError("SSE line is not valid UTF-8") from exc
        name, sep, value = line.partition(":")
        if sep and value.startswith(" "):
            value = value[1:]
        if name == "data":
            self._data.append(value)
            self._data_len += len(value) + 1
            if self._data_len > self._max_event:
                raise SSEError(f"SSE event larger than {self._max_event} bytes")
        elif name == "event":
            self._event = value
        elif name == "id" and "\0" not in value:
            self._last_id = value
        # "retry" and unknown fields are ignored
        return None

    def _dispatch(self) -> SSEEvent | None:
        if not self._data:
            self._event = ""
            return None
        ev = SSEEvent(event=self._event or "message", data="\n".join(self._data), id=self._last_id)
        self._event = ""
        self._data = []
        self._data_len = 0
        return ev


def encode_data(payload: str) -> bytes:
    """One ``data:`` event. Multi-line payloads become several ``data:`` lines."""
    if "\n" not in payload and "\r" not in payload:
        return b"data: " + payload.encode() + b"\n\n"
    lines = payload.replace("\r\n", "\n").replace("\r", "\n").split("\n")
    return b"".join(b"data: " + ln.encode() + b"\n" for ln in lines) + b"\n"


def encode_comment(text: str = "") -> bytes:
    """A comment line: ignored by every SSE client, keeps intermediaries from timing out."""
    return b": " + text.replace("\n", " ").encode() + b"\n\n"
