"""The baselines l3ptp is measured against: plain veth, OpenVPN 2.6 and wireguard-go.

Their Debian packages are installed with apt-get when missing (unless
--skip-install); their daemons run in the lab's namespaces and are stopped by PID.
"""

from __future__ import annotations

import base64
import datetime
import os
import re
import shutil
import subprocess
import time
from collections.abc import Callable, Sequence
from typing import Any

from lab.bench.common import TUNNEL_MTU, BenchError, say
from lab.netns import netlink

__all__ = ["BASELINES", "EQUAL_MTU_SUFFIX", "PACKAGES", "Daemons", "baseline_kind", "ensure_packages", "make_pki",
           "start_openvpn", "start_wireguard"]

#: Each tunnel twice: at its own defaults (what its users get: OpenVPN's tun-mtu 1500, wireguard-go's 1420)
#: and at l3ptp's inner MTU (`<name>@1280`), the equal-MTU comparison.
EQUAL_MTU_SUFFIX = f"@{TUNNEL_MTU}"
BASELINES = ("veth", "openvpn", f"openvpn{EQUAL_MTU_SUFFIX}", "wireguard-go", f"wireguard-go{EQUAL_MTU_SUFFIX}")
OVPN_ADDR = ("198.19.1.1", "198.19.1.2")
WG_ADDR = ("198.19.2.1", "198.19.2.2")
WG_PREFIXLEN = 24
OVPN_PORT = 1194
WG_PORT = 51820
#: Debian package -> program it provides, per baseline.
PACKAGES = {"openvpn": {"openvpn": "openvpn"},
            "wireguard-go": {"wireguard-go": "wireguard-go", "wireguard-tools": "wg"}}


def baseline_kind(name: str) -> tuple[str, int | None]:
    """'openvpn@1280' -> ('openvpn', 1280); 'openvpn' -> ('openvpn', None): None is the tunnel's own default MTU."""
    if name.endswith(EQUAL_MTU_SUFFIX):
        return name[: -len(EQUAL_MTU_SUFFIX)], TUNNEL_MTU
    return name, None


def ensure_packages(baselines: Sequence[str], skip_install: bool) -> None:
    """Install the Debian packages of the asked baselines that are missing (unless --skip-install)."""
    kinds = dict.fromkeys(baseline_kind(b)[0] for b in baselines)
    missing = list(dict.fromkeys(pkg for b in kinds for pkg, prog in PACKAGES.get(b, {}).items()
                                 if shutil.which(prog) is None))
    for prog in ("iperf3", "ping"):
        if shutil.which(prog) is None:
            missing.append({"ping": "iputils-ping"}.get(prog, prog))
    if not missing:
        return
    if skip_install:
        raise BenchError(f"missing Debian packages {', '.join(missing)} (and --skip-install was given)")
    say(f"installing missing Debian packages: {' '.join(missing)} (apt-get)")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    for argv, timeout in ((["apt-get", "update", "-qq"], 300),
                          (["apt-get", "install", "-y", "-qq", *missing], 600)):
        res = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=timeout)
        if res.returncode != 0:
            raise BenchError(f"{' '.join(argv)} failed ({res.returncode}): {(res.stderr or res.stdout)[-1000:]}")


# ---- background daemons inside a lab host --------------------------------------------------


class Daemons:
    """Baseline daemons started in the lab's namespaces (`Lab.spawn`); stopped by PID (TERM, then KILL)."""

    def __init__(self, lab: Any) -> None:
        self.lab = lab
        self.procs: list[tuple[Any, str]] = []

    def start(self, host: Any, name: str, argv: list[str], env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
        proc = self.lab.spawn(host, name, argv, env=env)
        self.procs.append((host, name))
        return proc

    def log(self, host: Any, name: str) -> str:
        try:
            with open(host.logs[name]) as f:
                return f.read()
        except (OSError, KeyError):
            return ""

    def stop_all(self) -> None:
        for host, name in reversed(self.procs):
            self.lab.stop_process(host, name, wait=10)
            host.procs.pop(name, None)
        self.procs.clear()


def _wait_for(what: str, check: Callable[[], bool], timeout: float, procs: Sequence[subprocess.Popen[bytes]] = (),
              logs: Callable[[], str] = lambda: "") -> None:
    deadline = time.monotonic() + timeout
    while not check():
        for p in procs:
            if p.poll() is not None:
                raise BenchError(f"{what}: process {p.pid} exited with {p.returncode}:\n{logs()[-2000:]}")
        if time.monotonic() > deadline:
            raise BenchError(f"{what}: not ready within {timeout:g}s:\n{logs()[-2000:]}")
        time.sleep(0.1)


def make_pki(directory: str) -> dict[str, str]:
    """A throwaway EC CA and a server (A) and client (B) certificate; paths of the PEM files."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = datetime.datetime.now(datetime.timezone.utc)
    start, end = now - datetime.timedelta(hours=1), now + datetime.timedelta(days=1)

    def name(cn: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = (x509.CertificateBuilder().subject_name(name("l3ptp-bench-ca")).issuer_name(name("l3ptp-bench-ca"))
          .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
          .not_valid_before(start).not_valid_after(end)
          .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
          .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=False,
                                       data_encipherment=False, key_agreement=False, key_cert_sign=True,
                                       crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
          .sign(ca_key, hashes.SHA256()))
    paths = {"ca": os.path.join(directory, "ca.pem")}
    with open(paths["ca"], "wb") as f:
        f.write(ca.public_bytes(serialization.Encoding.PEM))
    for who, eku in (("a", ExtendedKeyUsageOID.SERVER_AUTH), ("b", ExtendedKeyUsageOID.CLIENT_AUTH)):
        key = ec.generate_private_key(ec.SECP256R1())
        cert = (x509.CertificateBuilder().subject_name(name(f"l3ptp-bench-{who}")).issuer_name(ca.subject)
                .public_key(key.public_key()).serial_number(x509.random_serial_number())
                .not_valid_before(start).not_valid_after(end)
                .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
                .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False,
                                             key_encipherment=False, data_encipherment=False, key_agreement=True,
                                             key_cert_sign=False, crl_sign=False, encipher_only=False,
                                             decipher_only=False), critical=True)
                .add_extension(x509.ExtendedKeyUsage([eku]), critical=False)
                .sign(ca_key, hashes.SHA256()))
        paths[f"{who}.crt"] = os.path.join(directory, f"{who}.crt")
        paths[f"{who}.key"] = os.path.join(directory, f"{who}.key")
        with open(paths[f"{who}.crt"], "wb") as f:
            f.write(cert.public_bytes(serialization.Encoding.PEM))
        fd = os.open(paths[f"{who}.key"], os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                      serialization.NoEncryption()))
    return paths


def link_mtu(host: Any, ifname: str) -> int:
    """The MTU the tunnel's interface has (what the daemon chose or was told)."""
    with netlink(host.netns) as ipr:
        return int(ipr.get_links(ifname=ifname)[0].get_attr("IFLA_MTU"))


def start_openvpn(lab: Any, daemons: Daemons, timeout: float, mtu: int | None = None) -> tuple[str, str, dict[str, int]]:
    """OpenVPN 2.6 p2p TLS (A tls-server, B tls-client), AES-256-GCM over UDP; (dst, iface, pids).

    `mtu` None: OpenVPN's own default (tun-mtu 1500), as it ships; otherwise --tun-mtu `mtu`.
    """
    pki_dir = os.path.join(lab.workdir, "pki")
    os.makedirs(pki_dir, mode=0o700)
    pki = make_pki(pki_dir)
    iface = f"ovpn{lab.tag}"
    procs = []
    for i, (host, peer) in enumerate(((lab.a, lab.b), (lab.b, lab.a))):
        who = host.name
        argv = ["openvpn", "--dev", iface, "--dev-type", "tun", "--proto", "udp",
                "--local", host.underlay, "--port", str(OVPN_PORT), "--remote", peer.underlay, str(OVPN_PORT),
                "--ifconfig", OVPN_ADDR[i], OVPN_ADDR[1 - i],
                "--tls-server" if who == "a" else "--tls-client",
                "--ca", pki["ca"], "--cert", pki[f"{who}.crt"], "--key", pki[f"{who}.key"],
                "--remote-cert-tls", "client" if who == "a" else "server",
                "--data-ciphers", "AES-256-GCM", "--data-ciphers-fallback", "AES-256-GCM",
                *(["--tun-mtu", str(mtu)] if mtu is not None else []), "--disable-dco", "--auth-nocache",
                "--script-security", "0", "--ping", "2", "--verb", "3"]
        if who == "a":
            argv += ["--dh", "none"]
        procs.append(daemons.start(host, "openvpn", argv))

    def ready() -> bool:
        return all("Initialization Sequence Completed" in daemons.log(h, "openvpn") for h in (lab.a, lab.b))

    _wait_for("openvpn", ready, timeout, procs, lambda: daemons.log(lab.a, "openvpn") + daemons.log(lab.b, "openvpn"))
    cipher = re.findall(r"Data Channel: cipher '([^']+)'", daemons.log(lab.a, "openvpn"))
    if cipher and cipher[-1] != "AES-256-GCM":
        raise BenchError(f"openvpn negotiated {cipher[-1]}, not AES-256-GCM")
    return OVPN_ADDR[1], iface, {"a.daemon": procs[0].pid, "b.daemon": procs[1].pid}


def _wg_key() -> tuple[str, str]:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

    key = X25519PrivateKey.generate()
    raw = serialization.Encoding.Raw
    priv = key.private_bytes(raw, serialization.PrivateFormat.Raw, serialization.NoEncryption())
    pub = key.public_key().public_bytes(raw, serialization.PublicFormat.Raw)
    return base64.b64encode(priv).decode(), base64.b64encode(pub).decode()


def _link_exists(host: Any, ifname: str) -> bool:
    with netlink(host.netns) as ipr:
        return bool(ipr.link_lookup(ifname=ifname))


def start_wireguard(lab: Any, daemons: Daemons, timeout: float, mtu: int | None = None) -> tuple[str, str, dict[str, int]]:
    """wireguard-go on both hosts, keys and peer with `wg set`, address/MTU/up with pyroute2.

    `mtu` None: the MTU wireguard-go gives its device (1420, as wg-quick would too); otherwise `mtu`.
    """
    keys = {h: _wg_key() for h in "ab"}
    pids = {}
    for i, (host, peer) in enumerate(((lab.a, lab.b), (lab.b, lab.a))):
        iface = f"wg{lab.tag}{host.name}"  # unique: the UAPI socket path is not per namespace
        proc = daemons.start(host, "wireguard-go", ["wireguard-go", "-f", iface],
                             env={"WG_PROCESS_FOREGROUND": "1", "LOG_LEVEL": "error"})
        pids[f"{host.name}.daemon"] = proc.pid
        _wait_for("wireguard-go", lambda: _link_exists(host, iface) and os.path.exists(f"/var/run/wireguard/{iface}.sock"),
                  timeout, [proc], lambda: daemons.log(host, "wireguard-go"))
        key_path = os.path.join(lab.workdir, f"wg-{host.name}.key")
        fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(keys[host.name][0] + "\n")
        peer_net = WG_ADDR[1 - i].rsplit(".", 1)[0] + ".0/24"
        lab.run(host, ["wg", "set", iface, "listen-port", str(WG_PORT), "private-key", key_path,
                       "peer", keys[peer.name][1], "endpoint", f"{peer.underlay}:{WG_PORT}",
                       "allowed-ips", peer_net], timeout=15)
        with netlink(host.netns) as ipr:
            idx = ipr.link_lookup(ifname=iface)[0]
            ipr.addr("add", index=idx, address=WG_ADDR[i], prefixlen=WG_PREFIXLEN)
            if mtu is not None:
                ipr.link("set", index=idx, mtu=mtu)
            ipr.link("set", index=idx, state="up")
    return WG_ADDR[1], f"wg{lab.tag}a", pids
