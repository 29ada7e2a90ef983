"""The sans-IO SSE decoder: spec cases, arbitrary chunking, caps, and typed errors only."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from trio_gateway.codecs.sse import SSEDecoder, SSEError, SSEEvent, encode_comment, encode_data


def decode_all(chunks: list[bytes]) -> list[SSEEvent]:
    d = SSEDecoder()
    out: list[SSEEvent] = []
    for c in chunks:
        out.extend(d.feed(c))
    return out


def test_basic_fields_comments_and_line_endings() -> None:
    raw = b': hello\r\nevent: delta\r\ndata: a\rdata:b\n\nid: 7\ndata: {"x": 1}\n\n'
    evs = decode_all([raw])
    assert evs == [SSEEvent("delta", "a\nb", None), SSEEvent("message", '{"x": 1}', "7")]


def test_bom_and_blank_events() -> None:
    assert decode_all([b"\xef\xbb", b"\xbfdata: x\n\n\n\n"]) == [SSEEvent("message", "x")]
    assert decode_all([b"event: ping\n\n"]) == []  # no data: nothing dispatched


def test_cr_at_chunk_boundary_is_one_line_end() -> None:
    assert decode_all([b"data: a\r", b"\n\r", b"\n"]) == [SSEEvent("message", "a")]


def test_caps_raise_typed_errors() -> None:
    d = SSEDecoder(max_line=16)
    with pytest.raises(SSEError):
        d.feed(b"data: " + b"x" * 32)
    d2 = SSEDecoder(max_event=10)
    with pytest.raises(SSEError):
        d2.feed(b"data: 123456\ndata: 123456\n")
    with pytest.raises(SSEError):
        SSEDecoder().feed(b"data: \xff\xfe\n\n")


def test_close_rejects_partial_line() -> None:
    d = SSEDecoder()
    d.feed(b"data: complete\n\ndata: trunc")
    with pytest.raises(SSEError):
        d.close()
    SSEDecoder().close()


payloads = st.lists(
    st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=40), max_size=8
)


@given(payloads, st.data())
@settings(max_examples=300, deadline=None)
def test_encode_then_decode_any_chunking(texts: list[str], data: st.DataObject) -> None:
    wire = b"".join(encode_data(t) for t in texts) + encode_comment("keep-alive")
    cuts = sorted(data.draw(st.lists(st.integers(0, len(wire)), max_size=10)))
    chunks = [wire[a:b] for a, b in zip([0, *cuts], [*cuts, len(wire)], strict=True)]
    got = [e.data for e in decode_all(chunks)]
    expected = [t.replace("\r\n", "\n").replace("\r", "\n") for t in texts if True]
    # an event whose data is empty still dispatches (it had a data: line)
    assert got == expected


@given(st.lists(st.binary(max_size=64), max_size=20))
@settings(max_examples=500, deadline=None)
def test_arbitrary_bytes_only_typed_errors(chunks: list[bytes]) -> None:
    d = SSEDecoder(max_line=128, max_event=256)
    try:
        for c in chunks:
            for ev in d.feed(c):
                assert isinstance(ev.data, str)
        d.close()
    except SSEError:
        pass
