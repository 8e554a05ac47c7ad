"""Every limit and magic number of l3ptp, in one place.

Two groups, in the manner of wireguard-go's constants: *protocol* values are
part of the wire contract with the peer and must not change without a new
protocol version; *implementation* values are local limits that may be tuned.
A literal 1280 (or any other of these numbers) anywhere else is a bug.
"""

from __future__ import annotations

# --------------------------------------------------------------------------
# Protocol: L3PTP over QUIC
# --------------------------------------------------------------------------

#: 2: the listener sends CHALLENGE, and its HELLO only after the connector's
#: AUTH (version 1 sent its HELLO, with the nonce, before AUTH).
PROTOCOL_VERSION = 2
#: ALPN token offered and required on every QUIC connection.
ALPN = "l3ptp/1"

#: L3PTP DATAGRAM header (seed roadmap, "Data Plane").
HEADER_TYPE_IP = 0x03
HEADER_VERSION = 0x01
HEADER_LEN = 16

#: Tunnel MTU policy (seed roadmap, "MTU Policy").
MTU_DEFAULT = 1280
MTU_MIN = 576
MTU_MAX = 9000

#: IP versions carried.
IP_VERSION_4 = 4
IP_VERSION_6 = 6
IPV4_MIN_HEADER = 20
IPV6_HEADER = 40

#: aioquic's `max_datagram_size` default (1200) cannot carry a 1280-byte inner
#: packet plus our 16-byte header. 1350 can (see docs/protocol.md, "Sizing").
MAX_DATAGRAM_SIZE_DEFAULT = 1350
MAX_DATAGRAM_SIZE_MIN = 1200
MAX_DATAGRAM_SIZE_MAX = 9216
#: QUIC overhead of a 1-RTT packet with one DATAGRAM frame, apart from the
#: DCID: 1 flags byte + 4-byte packet number (both engines send 2) + 16-byte
#: AEAD tag + 1 frame type + 2-byte length varint.
QUIC_OVERHEAD_NO_CID = 1 + 4 + 16 + 1 + 2
#: Longest connection ID (RFC 9000), assumed when the engine hides the peer's.
MAX_CID_LEN = 20
#: Worst-case per-packet QUIC overhead for one DATAGRAM frame (the longest
#: DCID). Config validation uses this bound; the worker computes the exact
#: figure per connection.
QUIC_DATAGRAM_OVERHEAD_MAX = QUIC_OVERHEAD_NO_CID + MAX_CID_LEN
#: Advertised max_datagram_frame_size (RFC 9221 recommends 65535).
MAX_DATAGRAM_FRAME_SIZE = 65536

#: Control stream framing: 4-byte big-endian length + msgpack body.
CONTROL_FRAME_PREFIX = 4
CONTROL_FRAME_MAX = 64 * 1024
#: Auth challenge nonce length (bytes).
AUTH_NONCE_LEN = 32
#: Domain separation label signed in the connector's proof.
AUTH_LABEL = b"l3ptp auth v1"
#: The one code-and-reason every authentication failure is closed with on the
#: wire (wrong key, bad signature, wrong network or endpoint): a prober learns
#: nothing from which check failed. The local log keeps the detail.
AUTH_FAILED_REASON = "authentication failed"

#: Defaults for liveness (seconds).
KEEPALIVE_INTERVAL_DEFAULT = 10.0
KEEPALIVE_INTERVAL_MIN = 0.2
KEEPALIVE_INTERVAL_MAX = 60.0
#: A peer silent for this many keepalive intervals is dead.
DEAD_PEER_INTERVALS = 3
#: QUIC idle timeout (transport parameter max_idle_timeout), the same for
#: every configuration so that it tells nothing about keepalive_interval;
#: above the longest dead-peer bound (KEEPALIVE_INTERVAL_MAX *
#: DEAD_PEER_INTERVALS), so the session notices a dead peer first.
QUIC_IDLE_TIMEOUT = KEEPALIVE_INTERVAL_MAX * (DEAD_PEER_INTERVALS + 2)
RECONNECT_BACKOFF_MIN = 0.5
RECONNECT_BACKOFF_MAX = 30.0

#: QUIC key update (RFC 9001, 6): a worker starts one after this many
#: DATAGRAMs sent plus received under the current keys (an upper bound on the
#: packets it encrypted, ACK-only packets included), half of AES-GCM's
#: confidentiality limit of 2^23 packets per key (RFC 9001, 6.6), or after
#: this many seconds, whichever comes first. Not WireGuard's 120 s: qh3 keeps
#: no old keys, so each update it starts loses the peer's packets in flight
#: (about an RTT's worth); ten minutes still bounds what a leaked traffic
#: secret exposes of the past.
KEY_UPDATE_PACKETS = 2**22
KEY_UPDATE_INTERVAL = 600.0

# --------------------------------------------------------------------------
# Implementation limits
# --------------------------------------------------------------------------

#: Linux IFNAMSIZ is 16 including the NUL byte.
IFNAME_MAX = 15
IFNAME_ALLOWED = "abcdefghijklmnopqrstuvwxyz0123456789-"
IFNAME_PREFIX_DEFAULT = "l3p-"

#: Networks, queues, routes, addresses.
NETWORK_NAME_MAX = 32
MAX_QUEUES = 64
MAX_NETWORKS = 64
MAX_ROUTES_PER_NETWORK = 256
MAX_ADDRESSES_PER_NETWORK = 16
MAX_PREFIXES_PER_LIST = 256
NODE_ID_MAX = 64
REASON_MAX = 512
FEATURES_MAX = 32
#: HELLO feature: the sender acts on RENEW (a connector opens a new connection and moves the session to it).
FEATURE_RENEW = "renew"

#: Message size caps per channel (bytes), checked before decoding.
HELPER_MESSAGE_MAX = 16 * 1024
WORKER_CONFIG_MAX = 64 * 1024
#: Cap on one controller <-> fork server (zygote) message (ipc/fork_messages.py).
FORK_MESSAGE_MAX = 4 * 1024
#: How often the controller starts a fork server before it spawns every worker as its own process.
FORK_SERVER_STARTS_MAX = 5
BUS_MESSAGE_MAX = 256 * 1024
CLI_MESSAGE_MAX = 1024 * 1024

#: Route protocol number put on every route the helper installs
#: (`ip route` shows "proto l3ptp" with packaging's rt_protos.d file).
#: Chosen outside the kernel's and the well-known allocations
#: (0-4, 8-18, 42, 84, 99, 186-192).
RTPROT_L3PTP = 157
#: Routing table the helper uses by default (the main table).
ROUTE_TABLE_DEFAULT = 254
ROUTE_METRIC_DEFAULT = 100
#: Metric of the kill-switch routes: `unreachable`, proto l3ptp, one per
#: prefix a network routes or addresses, behind every tunnel route (whose
#: metric must be lower), so the prefix never falls through to another route.
KILL_SWITCH_METRIC = 0xFFFF_FFFF
#: fwmark set on the workers' UDP sockets and the priority of the policy rule
#: that sends marked packets to the main table ahead of any tunnel route.
SOCKET_MARK_DEFAULT = 0x4C33
RULE_PRIORITY_DEFAULT = 5157

#: A helper client that has not sent Hello this many seconds after connecting
#: is dropped (and audited); everyone else keeps being served.
HELPER_HELLO_TIMEOUT = 5.0
#: After Hello, a session silent this long is dropped (audited): a worker
#: needs two requests within milliseconds of each other; the controller asks
#: ListNetworks every 2 s and reconnects when dropped.
HELPER_IDLE_TIMEOUT_WORKER = 10.0
HELPER_IDLE_TIMEOUT_CONTROLLER = 60.0
#: Helper sessions: at most this many in all, at most HELPER_MAX_SESSIONS_PER_UID
#: per uid, and the last HELPER_CONTROLLER_RESERVED only for the policy's
#: controller uids. A uid at its limit gets its least recently active session
#: closed for the new one; a uid in neither uid list of the policy is refused
#: at accept.
HELPER_MAX_SESSIONS = 128
HELPER_MAX_SESSIONS_PER_UID = 64
HELPER_CONTROLLER_RESERVED = 8
HELPER_LISTEN_BACKLOG = 128
#: Connections accepted per turn of the helper's loop.
HELPER_ACCEPT_BATCH = 64
#: Fds a request may carry (ProtectSocket needs one). The helper receives up
#: to the kernel's SCM_MAX_FD so that none is dropped (closed) inside recvmsg.
HELPER_MAX_FDS_PER_MESSAGE = 4
SCM_MAX_FD = 253
#: Received fds (and dropped connections, which may hold queued fds) are
#: closed on at most this many threads, never on the loop: a close blocks
#: as long as the sender likes (SO_LINGER, a FUSE flush, a tty draining).
#: Past HELPER_CLOSE_BACKLOG fds waiting, the loop closes inline.
HELPER_CLOSE_THREADS = 16
HELPER_CLOSE_BACKLOG = 1024
#: Repeated audit lines of one kind (uid, action, result, code) other than a
#: privileged action done: the first in a window is written in full, the
#: rest counted and summarised in one line when the window ends. At most
#: HELPER_AUDIT_KEYS kinds are tracked; more uids share one summary.
HELPER_AUDIT_WINDOW = 10.0
HELPER_AUDIT_KEYS = 256

#: Single-use fd tickets.
TICKET_BYTES = 24
TICKET_TTL = 30.0

#: Worker data path.
TUN_READ_BATCH = 64
UDP_RECV_BATCH = 64
#: UDP GSO: at most this many segments per sendmsg (the kernel's
#: UDP_MAX_SEGMENTS is 64) and this many bytes (an IPv4/IPv6 payload must
#: stay below 65535 with headers).
UDP_GSO_MAX_SEGMENTS = 64
UDP_GSO_MAX_BYTES = 65000
#: SO_RCVBUF / SO_SNDBUF asked for on a worker's UDP socket (capped by the
#: kernel at net.core.rmem_max / wmem_max).
UDP_SOCKET_BUFFER = 4 * 1024 * 1024
DATAGRAM_QUEUE_MAX = 256

#: Listener admission of new QUIC connections (worker/admission.py). Token
#: buckets (rate per second, burst): Initials that would build a connection
#: without address validation, in total and per source address; Initials that
#: carry a valid Retry token; stateless Retry answers sent when the first two
#: are spent. Beyond all of them an Initial is dropped (`initial_over_budget`).
#: A legitimate peer makes one attempt per reconnect, so the first budget
#: never delays it unless someone else floods.
NEW_CONN_RATE, NEW_CONN_BURST = 5.0, 8
NEW_CONN_PER_SOURCE_RATE, NEW_CONN_PER_SOURCE_BURST = 2.0, 4
VALIDATED_CONN_RATE, VALIDATED_CONN_BURST = 20.0, 8
RETRY_RATE, RETRY_BURST = 200.0, 20
#: Per-source buckets kept at most (the oldest go first).
ADMISSION_SOURCES_MAX = 1024
#: Seconds a Retry token is good for.
RETRY_TOKEN_LIFETIME = 10.0
#: Listener candidate connections at most, and seconds one may take from its
#: first Initial to ESTABLISHED before it is dropped.
MAX_CANDIDATES = 4
CANDIDATE_LIFETIME = 10.0
#: Datagrams a candidate may receive before its QUIC handshake completes (a
#: handshake takes two to six, a few retransmissions more); the rest are
#: dropped: each one an engine has to try costs it new initial keys.
CANDIDATE_DATAGRAMS_MAX = 16
STATUS_INTERVAL = 1.0
#: Controller treats a worker silent for this long as dead.
WORKER_STATUS_TIMEOUT = 10.0
#: Worker exits when the controller has been silent this long. Long enough
#: for a crashed controller to be restarted (systemd: RestartSec=2s) and to
#: adopt it; short enough that a controller that never comes back does not
#: leave an unsupervised tunnel for long.
CONTROLLER_SILENCE_TIMEOUT = 30.0
#: Orderly controller stop (SIGTERM/SIGINT: `systemctl stop` or `restart`): the
#: controller sends each worker `Handover(grace)` and exits without stopping it.
#: A worker keeps carrying traffic and exits cleanly (CLOSE to the peer,
#: "controller stopped") when no controller has spoken to it within this many
#: seconds: room for a restart (interpreter start, helper, adoption), short
#: enough that `systemctl stop` leaves an unsupervised tunnel only briefly.
HANDOVER_GRACE = 10.0

#: Supervision.
RESTART_BACKOFF_MIN = 0.5
RESTART_BACKOFF_MAX = 30.0
RESTART_WINDOW = 60.0
RESTART_MAX_IN_WINDOW = 5
#: A worker that ran this many seconds before it exited was started
#: successfully (supervisord's startsecs): its crash history is forgotten, so
#: it is restarted at once and a kill -9 now and then never adds a delay.
RESTART_STABLE = 3.0
#: Seconds between asking a worker to stop (Shutdown + SIGTERM) and SIGKILL.
STOP_GRACE = 5.0
#: Seconds the controller waits for one reply of the helper.
HELPER_TIMEOUT = 10.0
#: Seconds the controller waits for polkit's answer to one CheckAuthorization
#: (connect to the system bus included); no answer means "not authorised".
POLKIT_TIMEOUT = 3.0

#: polkit actions (packaging/polkit/org.l3ptp.policy): reading the status, and
#: up / down / reload.
POLKIT_ACTION_STATUS = "org.l3ptp.status"
POLKIT_ACTION_MANAGE = "org.l3ptp.manage"

#: Defaults for paths.
#: The controller's own directory (control.sock, workers.sock): the
#: controller unit's RuntimeDirectory=l3ptp/ctl. /run/l3ptp itself belongs to
#: root and holds the helper socket.
RUNTIME_DIR_DEFAULT = "/run/l3ptp/ctl"
#: The CLI socket's name in the controller's runtime directory.
CONTROL_SOCKET = "control.sock"
HELPER_SOCKET_DEFAULT = "/run/l3ptp/helper.sock"
HELPER_POLICY_DEFAULT = "/etc/l3ptp/helper-policy.toml"
CONFIG_DEFAULT = "/etc/l3ptp/l3ptp.toml"
METRICS_ADDRESS_DEFAULT = "127.0.0.1"
METRICS_PORT_DEFAULT = 9586


def datagram_budget(max_datagram_size: int, overhead: int = QUIC_DATAGRAM_OVERHEAD_MAX) -> int:
    """Largest inner IP packet that fits one DATAGRAM for this QUIC packet size."""
    return max_datagram_size - overhead - HEADER_LEN


# ---- mtu = "auto" (issue 16; docs/protocol.md, "MTU policy") ---------------

#: The configuration value that derives the tunnel MTU from the underlay path.
MTU_AUTO = "auto"
#: UDP header in front of every QUIC packet.
UDP_HEADER = 8
#: Linux socket options of the path MTU probe (Python's socket module lacks
#: them): <linux/in.h> and <linux/in6.h>.
IP_MTU_DISCOVER = 10
IP_PMTUDISC_DO = 2
IP_MTU = 14
IPV6_MTU_DISCOVER = 23
IPV6_PMTUDISC_DO = 2
IPV6_MTU = 24
#: <linux/sockios.h>, <linux/if.h>: an interface's MTU and flags by name.
SIOCGIFFLAGS = 0x8913
SIOCGIFMTU = 0x8921
IFF_UP = 0x1
IFF_LOOPBACK = 0x8


# ---- REALITY (issue 15; docs/protocol.md, "REALITY") ----------------------

#: A REALITY short id is at most 8 bytes (16 hex digits in the configuration).
REALITY_SHORT_ID_MAX = 8
#: Short ids one listener accepts.
REALITY_SHORT_IDS_MAX = 16
#: A DNS name (the camouflage target, the SNI) is at most 253 characters.
HOSTNAME_MAX = 253
#: The characters of a DNS name or an IP literal (the configuration checks the form; docs/configuration.md).
HOSTNAME_PATTERN = r"[A-Za-z0-9.:-]{1,253}"

#: Keys pinned for one peer at once (issue 18: an old and a new one while rotating; a few spare).
PEER_KEYS_MAX = 8

# ---- one UDP port per network (helper/reuseport.py) -------------------------
#: Seconds a restarted helper waits for a socket to leave the previous helper's steering map (freed by the
#: kernel after our program replaced the old one; about 25 ms measured) before refusing it with BUSY.
STEERING_RELEASE_WAIT = 0.5
