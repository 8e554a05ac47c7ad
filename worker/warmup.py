"""Start-up warm-up of the QUIC engines (`warm_up`): one throwaway in-memory handshake per engine."""

from __future__ import annotations

from typing import Any

from l3ptp.ipc.control_messages import Engine

from .engine import available_engines, load_engine

__all__ = ["exchange", "warm_up"]


#: Rounds of datagram exchange `warm_up` allows for one handshake (one to three are used).
_WARM_UP_ROUNDS = 8
_CLIENT_ADDR, _SERVER_ADDR = ("127.0.0.1", 2), ("127.0.0.1", 1)


def warm_up() -> list[Engine]:
    """One throwaway QUIC handshake, in memory, with each engine that loads; the engines that completed it.

    The first handshake of a process pays one-time costs (qh3: about 0.1-0.15 s in its first key
    exchange, at the connector's ClientHello and the listener's first candidate), which would fall in
    the recovery after a worker's kill -9. The controller's spare worker runs this while it waits for its
    configuration (worker/__main__.py), so a replacement starts with them paid. No socket, no I/O.
    """
    from l3ptp.ipc.constants import ALPN

    from . import keys

    key = keys.generate_private_key()
    cert = keys.self_signed_certificate(key)
    warmed = []
    for engine in available_engines():
        e = load_engine(engine)
        ccfg = e.QuicConfiguration(is_client=True, alpn_protocols=[ALPN])
        e.configure_tls(ccfg, True, key, None)
        ccfg.server_name = "warm-up"
        scfg = e.QuicConfiguration(is_client=False, alpn_protocols=[ALPN])
        e.configure_tls(scfg, False, key, cert)
        client = e.QuicConnection(configuration=ccfg)
        client.connect(_SERVER_ADDR, now=0.0)
        if exchange(e, client, scfg, _WARM_UP_ROUNDS)[1]:
            warmed.append(engine)
    return warmed


def exchange(e: Any, client: Any, scfg: Any, rounds: int, *, until_done: bool = True,
             on_round: Any = None, events: list[tuple[str, Any]] | None = None) -> tuple[Any, bool]:
    """Run `client` (connect()ed) and a server made from configuration `scfg` for its first Initial through
    `rounds` 1 ms rounds of datagram exchange in memory: (the server, whether both completed the handshake).
    `until_done`: stop once both did. `on_round(round, client datagrams, server)` sees each round before the
    server gets them; the connections' events are consumed here, and kept in `events` ("client" or "server",
    event) if given (the tests' in-memory pair)."""
    from .admission import parse_initial

    server: Any = None
    done: set[str] = set()
    for rnd in range(rounds):
        now = rnd * 0.001
        out = [d for d, _ in client.datagrams_to_send(now=now)]
        if out and server is None:
            initial = parse_initial(out[0])
            if initial is None:
                break
            server = e.QuicConnection(configuration=scfg, original_destination_connection_id=initial.dcid)
        if on_round is not None:
            on_round(rnd, out, server)
        if out:
            e.receive_many(server, out, _CLIENT_ADDR, now)
        if server is not None:
            back = [d for d, _ in server.datagrams_to_send(now=now)]
            if back:
                e.receive_many(client, back, _SERVER_ADDR, now)
        for name, conn in (("client", client), ("server", server)):
            while conn is not None and (event := conn.next_event()) is not None:
                if events is not None:
                    events.append((name, event))
                if isinstance(event, e.events.HandshakeCompleted):
                    done.add(name)
        if until_done and done == {"client", "server"}:
            break
    return server, done == {"client", "server"}
