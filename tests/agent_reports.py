"""Agents' reports as tests read and forge them: the payload inside the signed
envelope, and the same payload changed and signed again with an agent's own
identity key (what a hostile or broken agent could write)."""

from __future__ import annotations

import base64
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from trustmgr.agent.document import key_id, public_key_pem


def payload(envelope: bytes | str) -> dict[str, Any]:
    """The report inside ``envelope``, as JSON."""
    data: dict[str, Any] = json.loads(base64.b64decode(json.loads(envelope)["payload"]))
    return data


def identity_of(local_record: Path) -> Ed25519PrivateKey:
    """The identity key in a directory agent's own record (``.trustmgr-agent.json``)."""
    pem = json.loads(local_record.read_text())["identityKey"].encode()
    key = serialization.load_pem_private_key(pem, password=None)
    assert isinstance(key, Ed25519PrivateKey)
    return key


def signed(report: dict[str, Any], key: Ed25519PrivateKey) -> bytes:
    """``report`` signed with ``key``, as an agent writes it."""
    return _signed_bytes(json.dumps(report, sort_keys=True).encode(), key)


def _signed_bytes(data: bytes, key: Ed25519PrivateKey) -> bytes:
    return json.dumps(
        {
            "payload": base64.b64encode(data).decode(),
            "key": key_id(key.public_key()),
            "publicKey": public_key_pem(key.public_key()).decode(),
            "signature": base64.b64encode(key.sign(data)).decode(),
        }
    ).encode()


def rewrite(directory: Path, change: Callable[[dict[str, Any]], None]) -> None:
    """Change the report of the directory agent in ``directory`` and sign it again
    with that agent's own key."""
    path = directory / "trustmgr-report.json"
    report = payload(path.read_bytes())
    change(report)
    path.write_bytes(signed(report, identity_of(directory / ".trustmgr-agent.json")))


def rewrite_text(directory: Path, change: Callable[[str], str]) -> None:
    """Change the report's JSON as text (what no JSON library writes) and sign the
    bytes again with the directory agent's own key."""
    path = directory / "trustmgr-report.json"
    text = change(base64.b64decode(json.loads(path.read_bytes())["payload"]).decode())
    path.write_bytes(_signed_bytes(text.encode(), identity_of(directory / ".trustmgr-agent.json")))
