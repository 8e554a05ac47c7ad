"""Property tests: every untrusted decoder raises only DecodeError; valid messages round-trip."""

from __future__ import annotations

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from l3ptp.ipc.channels import ALL_CHANNELS
from l3ptp.ipc.codec import Channel, StreamDecoder, frame
from l3ptp.ipc.errors import DecodeError
from l3ptp.ipc.peer_messages import PEER_CONTROL
from tests.support.strategies import valid_messages

FUZZ = settings(max_examples=1000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
IDS = [c.name for c in ALL_CHANNELS]


def _decode_only_typed_error(channel: Channel, data: bytes) -> None:
    try:
        msg = channel.decode_untrusted(data)
    except DecodeError:
        return
    # Anything that decodes must be a valid message of this channel that
    # re-encodes to an equivalent message.
    assert type(msg) in channel.types
    assert channel.decode_untrusted(channel.encode(msg)) == msg


@pytest.mark.parametrize("channel", ALL_CHANNELS, ids=IDS)
@FUZZ
@given(data=st.data())
def test_round_trip_exact(channel: Channel, data: st.DataObject) -> None:
    msg = data.draw(valid_messages(channel))
    encoded = channel.encode(msg)
    assert channel.decode_untrusted(encoded) == msg
    assert channel.encode(channel.decode_untrusted(encoded)) == encoded


@pytest.mark.parametrize("channel", ALL_CHANNELS, ids=IDS)
@FUZZ
@given(blob=st.binary(max_size=512))
def test_random_bytes(channel: Channel, blob: bytes) -> None:
    _decode_only_typed_error(channel, blob)


@pytest.mark.parametrize("channel", ALL_CHANNELS, ids=IDS)
@FUZZ
@given(data=st.data())
def test_mutated_valid_messages(channel: Channel, data: st.DataObject) -> None:
    encoded = bytearray(channel.encode(data.draw(valid_messages(channel))))
    for _ in range(data.draw(st.integers(1, 4))):
        op = data.draw(st.sampled_from(["flip", "truncate", "insert", "delete"]))
        pos = data.draw(st.integers(0, max(0, len(encoded) - 1)))
        if op == "flip" and encoded:
            encoded[pos] ^= 1 << data.draw(st.integers(0, 7))
        elif op == "truncate":
            del encoded[pos:]
        elif op == "insert":
            encoded[pos:pos] = data.draw(st.binary(min_size=1, max_size=8))
        elif op == "delete" and encoded:
            del encoded[pos]
    _decode_only_typed_error(channel, bytes(encoded))


_scalars = (
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)
    | st.floats()
    | st.text(max_size=20)
    | st.binary(max_size=20)
)
_structures = st.recursive(
    _scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=4),
    max_leaves=12,
)


@pytest.mark.parametrize("channel", ALL_CHANNELS, ids=IDS)
@FUZZ
@given(data=st.data())
def test_wellformed_msgpack_wrong_shape(channel: Channel, data: st.DataObject) -> None:
    """Valid msgpack with a known tag but arbitrary fields."""
    tag = data.draw(st.sampled_from([t.TAG for t in channel.types]))
    fields = data.draw(st.dictionaries(st.text(max_size=20), _structures, max_size=6))
    if data.draw(st.booleans()):
        # Start from a real message and replace one field with junk.
        msg = data.draw(valid_messages(channel))
        tag = msg.TAG
        fields = msg._encode_fields()
        if fields:
            key = data.draw(st.sampled_from(sorted(fields)))
            fields[key] = data.draw(_structures)
    blob = msgpack.packb([tag, fields], use_bin_type=True)
    _decode_only_typed_error(channel, blob)


@FUZZ
@given(data=st.data())
def test_stream_decoder_any_split(data: st.DataObject) -> None:
    msgs = data.draw(st.lists(valid_messages(PEER_CONTROL), min_size=1, max_size=5))
    stream = b"".join(frame(PEER_CONTROL, m) for m in msgs)
    decoder = StreamDecoder(PEER_CONTROL)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=6)))
    out = []
    prev = 0
    for cut in [*cuts, len(stream)]:
        out.extend(decoder.feed(stream[prev:cut]))
        prev = cut
    assert out == msgs
    assert decoder.buffered == 0


@FUZZ
@given(chunks=st.lists(st.binary(max_size=300), max_size=8))
def test_stream_decoder_garbage(chunks: list[bytes]) -> None:
    decoder = StreamDecoder(PEER_CONTROL)
    try:
        for chunk in chunks:
            decoder.feed(chunk)
            assert decoder.buffered <= PEER_CONTROL.max_bytes + 4
    except DecodeError:
        with pytest.raises(DecodeError):
            decoder.feed(b"")
