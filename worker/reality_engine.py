"""The connector's side of REALITY (worker/reality.py) in the QUIC engines' TLS, aioquic and qh3.

Neither engine lets a caller choose the client random as a function of the
ClientHello it is about to send, so for the one synchronous `connect()` call
that builds the first flight, the engine's `tls.push_client_hello` is wrapped:
the wrapper serialises the hello with a zero random (the authenticated data),
computes X25519 between the key share the engine just generated and the
listener's REALITY public key, seals the random and lets the engine write the
hello with it. The engine's transcript hash covers what is written, so TLS
goes on exactly as without the wrapper. The wrapper is in place only inside
`connect()` (single-threaded: the worker's loop does nothing else meanwhile)
and is always restored.

Session resumption (PSK) is not used by l3ptp; with it an engine writes the
hello twice with different binders, and the second random would not match.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from types import ModuleType
from typing import Any

from . import reality

__all__ = ["connect_sealed", "sealing_client_hello"]


def _shared(tls_context: Any, server_public: bytes) -> bytes:
    key = tls_context._x25519_private_key
    if key is None:
        raise RuntimeError("the engine offered no X25519 key share")
    if hasattr(key, "exchange") and type(key).__module__.startswith("cryptography"):
        from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PublicKey

        return key.exchange(X25519PublicKey.from_public_bytes(server_public))  # type: ignore[no-any-return]
    return bytes(key.exchange(server_public))  # qh3: X25519KeyExchange.exchange(raw public key) -> bytes


@contextlib.contextmanager
def sealing_client_hello(tls_module: ModuleType, context: Callable[[], Any], server_public: bytes,
                         short_id: bytes = bytes(8), clock: Callable[[], float] = time.time) -> Iterator[None]:
    """While inside, every ClientHello `tls_module` writes gets a REALITY-sealed random; `context()` gives the
    TLS context writing it (read lazily: the engine creates it inside connect)."""
    original = tls_module.push_client_hello
    now = clock()

    def push(buf: Any, hello: Any) -> None:
        hello.random = bytes(32)
        scratch = tls_module.Buffer(capacity=65536)
        original(scratch, hello)
        ctx = context()
        hello.random = reality.seal_random(_shared(ctx, server_public), bytes(scratch.data), now, short_id)
        ctx.client_random = hello.random
        original(buf, hello)

    tls_module.push_client_hello = push
    try:
        yield
    finally:
        tls_module.push_client_hello = original


def connect_sealed(conn: Any, addr: Any, now: float, server_public: bytes, short_id: bytes = bytes(8),
                   clock: Callable[[], float] = time.time) -> None:
    """`conn.connect(addr, now)` of an aioquic or qh3 QuicConnection, its ClientHello sealed for REALITY."""
    import importlib

    engine = next(c.__module__.split(".", 1)[0] for c in type(conn).__mro__ if c.__module__.startswith(("aioquic.", "qh3.")))
    tls_module = importlib.import_module(engine + ".tls")
    with sealing_client_hello(tls_module, lambda: conn.tls, server_public, short_id, clock):
        conn.connect(addr, now=now)
