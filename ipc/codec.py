"""The one msgpack codec of l3ptp. No other module imports msgpack.

Wire form of every message: a msgpack array ``[tag, {field: value, ...}]``.
Every field is always present; there are no optional keys on the wire
(``None`` is sent as nil where a field allows it).

Each channel (helper requests, helper replies, worker config, bus in each
direction, CLI in each direction, peer control stream) is a `Channel` with a
size cap and a closed set of message types. `Channel.decode_untrusted` is the
one door for outside bytes on that channel: it checks the size before
decoding, rejects unknown tags, unknown or missing fields, wrong types,
extension types and trailing bytes, and raises only `DecodeError`.

`StreamDecoder` frames messages on a byte stream (the QUIC control stream) as
a 4-byte big-endian length followed by the msgpack body, with the same
guarantees and a bounded buffer.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable
from typing import Any

import msgpack

from .constants import CONTROL_FRAME_PREFIX
from .errors import DecodeError, MessageTooLarge, SchemaError, UnexpectedMessage
from .schema import Message

_LEN = struct.Struct("!I")


def _reject_ext(code: int, data: bytes) -> Any:
    raise ValueError(f"msgpack extension type {code} not allowed")


class Channel:
    """A named set of message types with a size cap."""

    __slots__ = ("name", "max_bytes", "_by_tag", "_types")

    def __init__(self, name: str, max_bytes: int, types: Iterable[type[Message]]) -> None:
        self.name = name
        self.max_bytes = max_bytes
        self._types = tuple(types)
        self._by_tag = {t.TAG: t for t in self._types}
        if len(self._by_tag) != len(self._types):
            raise TypeError(f"channel {name}: duplicate message types")

    @property
    def types(self) -> tuple[type[Message], ...]:
        return self._types

    def encode(self, msg: Message) -> bytes:
        """Encode a message of this channel. Raises SchemaError on local misuse."""
        if type(msg) not in self._types:
            raise SchemaError(f"{type(msg).__name__} is not a {self.name} message")
        data = msgpack.packb([msg.TAG, msg._encode_fields()], use_bin_type=True)
        if len(data) > self.max_bytes:
            raise SchemaError(
                f"{type(msg).__name__} encodes to {len(data)} bytes, over the "
                f"{self.name} cap of {self.max_bytes}"
            )
        return data

    def decode_untrusted(self, data: bytes | bytearray | memoryview) -> Message:
        """Decode outside bytes into one of this channel's messages.

        Raises `DecodeError` (or its subclasses `MessageTooLarge`,
        `UnexpectedMessage`) and nothing else.
        """
        try:
            size = len(data)
        except TypeError:
            raise DecodeError(f"{self.name}: expected bytes") from None
        if size > self.max_bytes:
            raise MessageTooLarge(f"{self.name}: {size} bytes exceeds cap {self.max_bytes}")
        try:
            raw = msgpack.unpackb(
                data,
                raw=False,
                use_list=True,
                strict_map_key=True,
                ext_hook=_reject_ext,
                timestamp=0,
            )
        except Exception as exc:  # msgpack raises many types; all are bad input
            raise DecodeError(f"{self.name}: malformed msgpack ({type(exc).__name__})") from None
        if type(raw) is not list or len(raw) != 2:
            raise DecodeError(f"{self.name}: expected [tag, fields]")
        tag, fields = raw
        if type(tag) is not str:
            raise DecodeError(f"{self.name}: tag is not a string")
        cls = self._by_tag.get(tag)
        if cls is None:
            raise UnexpectedMessage(f"{self.name}: unknown message type {tag[:64]!r}")
        try:
            return cls._decode_fields(fields, cls.__name__)
        except DecodeError:
            raise
        except Exception as exc:  # defensive: a spec bug must not escape as another type
            raise DecodeError(f"{self.name}: {type(exc).__name__} while decoding {tag}") from None

    def decode_expect(self, data: bytes, *expected: type[Message]) -> Message:
        """Decode and require one of `expected`; otherwise UnexpectedMessage."""
        msg = self.decode_untrusted(data)
        if not isinstance(msg, expected):
            names = ", ".join(t.__name__ for t in expected)
            raise UnexpectedMessage(f"{self.name}: got {type(msg).__name__}, expected {names}")
        return msg


def frame(channel: Channel, msg: Message) -> bytes:
    """Encode a message with its 4-byte length prefix for a byte stream."""
    body = channel.encode(msg)
    return _LEN.pack(len(body)) + body


class StreamDecoder:
    """Incremental decoder for length-prefixed messages on a byte stream.

    `feed` returns the complete messages received so far. The buffer never
    holds more than one frame (prefix + at most ``channel.max_bytes``). After
    the first `DecodeError` the decoder is closed: the stream is out of sync
    and every later `feed` raises again.
    """

    __slots__ = ("channel", "_buf", "_error")

    def __init__(self, channel: Channel) -> None:
        self.channel = channel
        self._buf = bytearray()
        self._error: DecodeError | None = None

    @property
    def buffered(self) -> int:
        return len(self._buf)

    def feed(self, data: bytes | bytearray | memoryview) -> list[Message]:
        if self._error is not None:
            raise self._error
        try:
            return self._feed(data)
        except DecodeError as exc:
            self._error = exc
            self._buf.clear()
            raise

    def _feed(self, data: bytes | bytearray | memoryview) -> list[Message]:
        out: list[Message] = []
        view = memoryview(data)
        cap = self.channel.max_bytes
        while True:
            # Take only as many bytes as the current frame needs, so the
            # buffer stays bounded however much arrives at once.
            buf = self._buf
            if len(buf) < CONTROL_FRAME_PREFIX:
                need = CONTROL_FRAME_PREFIX - len(buf)
            else:
                (length,) = _LEN.unpack_from(buf)
                if length > cap:
                    raise MessageTooLarge(
                        f"{self.channel.name}: frame of {length} bytes exceeds cap {cap}"
                    )
                need = CONTROL_FRAME_PREFIX + length - len(buf)
                if need == 0:
                    body = bytes(buf[CONTROL_FRAME_PREFIX:])
                    buf.clear()
                    out.append(self.channel.decode_untrusted(body))
                    continue
            if not view:
                return out
            buf += view[:need]
            view = view[need:]
