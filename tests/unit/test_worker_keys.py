from __future__ import annotations

import base64
import hashlib
import os
import re

import pytest

from l3ptp.worker import keys


def test_fingerprint_format_and_value() -> None:
    k = keys.generate_private_key()
    raw = keys.public_key_raw(k)
    fp = keys.fingerprint(k)
    assert re.fullmatch(r"SHA256:[A-Za-z0-9+/]{43}", fp)
    assert fp == "SHA256:" + base64.b64encode(hashlib.sha256(raw).digest()).decode().rstrip("=")
    assert keys.fingerprint(raw) == fp == keys.fingerprint(k.public_key())


def test_save_load_roundtrip_mode_0600(tmp_path) -> None:
    k = keys.generate_private_key()
    path = tmp_path / "node.key"
    keys.save_private_key(k, path)
    assert os.stat(path).st_mode & 0o777 == 0o600
    assert keys.private_key_raw(keys.load_private_key(path)) == keys.private_key_raw(k)
    with pytest.raises(FileExistsError):
        keys.save_private_key(k, path)


def test_load_refuses_group_readable_and_garbage(tmp_path) -> None:
    path = tmp_path / "node.key"
    keys.save_private_key(keys.generate_private_key(), path)
    os.chmod(path, 0o640)
    with pytest.raises(keys.BadKey):
        keys.load_private_key(path)
    bad = tmp_path / "bad.key"
    bad.write_bytes(b"not a key")
    os.chmod(bad, 0o600)
    with pytest.raises(keys.BadKey):
        keys.load_private_key(bad)


def test_certificate_carries_the_node_key() -> None:
    k = keys.generate_private_key()
    cert = keys.self_signed_certificate(k)
    assert keys.fingerprint_of_certificate(cert) == keys.fingerprint(k)


def test_auth_signature_is_bound_to_the_transcript() -> None:
    k = keys.generate_private_key()
    t1 = keys.auth_transcript(b"\1" * 32, "SHA256:a", "SHA256:b", "net0", 0)
    t2 = keys.auth_transcript(b"\2" * 32, "SHA256:a", "SHA256:b", "net0", 0)
    t3 = keys.auth_transcript(b"\1" * 32, "SHA256:a", "SHA256:b", "net0", 1)
    sig = keys.sign_auth(k, t1)
    pub = keys.public_key_raw(k)
    assert keys.verify_auth(pub, sig, t1)
    assert not keys.verify_auth(pub, sig, t2)
    assert not keys.verify_auth(pub, sig, t3)
    assert not keys.verify_auth(b"\0" * 32, sig, t1)
    assert not keys.verify_auth(pub, b"\0" * 64, t1)
