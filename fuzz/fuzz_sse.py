"""Server-Sent Events: ``SSEDecoder`` fed the payload in fuzzed pieces, then ``close()``.

Input layout: see ``_fuzzlib`` (mode bit 0: small caps, so ``max_line`` / ``max_event`` trip).
Only ``SSEError`` may escape. Chunking must not matter: when the pieces decode without error,
feeding the whole payload at once succeeds with the same events.
"""

from __future__ import annotations

import sys

import atheris

with atheris.instrument_imports(include=["trio_gateway"]):
    from _fuzzlib import parse

    from trio_gateway.codecs.sse import SSEDecoder, SSEError, SSEEvent


def _decoder(small: bool) -> SSEDecoder:
    return SSEDecoder(max_line=64, max_event=128) if small else SSEDecoder()


def _run(dec: SSEDecoder, pieces: list[bytes]) -> list[SSEEvent]:
    events: list[SSEEvent] = []
    for piece in pieces:
        events.extend(dec.feed(piece))
    dec.close()
    return events


def TestOneInput(data: bytes) -> None:
    p = parse(data)
    small = bool(p.mode & 1)
    try:
        events = _run(_decoder(small), p.split())
    except SSEError:
        return
    for ev in events:
        assert isinstance(ev, SSEEvent) and ev.data is not None
    whole = _run(_decoder(small), [p.payload])
    assert whole == events, (whole, events)


def main() -> None:
    atheris.Setup(sys.argv, TestOneInput)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
