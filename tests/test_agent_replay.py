"""A replayed desired document that says what is desired now: the agent refuses it (its
sequence is older than the one applied), so the central run must publish past it rather than
take it for its own current publication and wait on the agent forever."""

from __future__ import annotations

import base64
import json
from pathlib import Path

from tests.agent_reports import payload
from tests.conftest import trustmgr

CONFIG = """\
stateStore: {file: {path: state}}
providers:
  corp: {selfSigned: {passphraseEnv: TRUSTMGR_PASSPHRASE}}
meshes:
  a:
    trustDomain: a.example
    provider: corp
    intermediates: {ttl: 720h, renewBefore: RENEW}
    clusters:
      a1: {directory: {path: out/a1}, mode: agent}
"""
DESIRED = Path("out/a1/trustmgr-desired.json")


def _round() -> None:
    assert trustmgr("reconcile").code == 0
    run = trustmgr("agent", "run", "--once", "-c", "agent.yaml")
    assert run.code == 0, run.err


def _plan_a1() -> dict[str, str]:
    (row,) = json.loads(trustmgr("plan", "-o", "json").out)["clusters"]
    assert isinstance(row, dict)
    return row


def test_a_put_back_document_equal_to_the_desired_state_is_published_past(
    workdir: Path,
) -> None:
    (workdir / "trustmgr.yaml").write_text(CONFIG.replace("RENEW", "240h"))
    (workdir / "agent.yaml").write_text(
        "cluster: a1\npublisherKeyFile: publisher.pem\ndirectory: {path: out/a1}\n"
    )
    assert trustmgr("agent", "publisher-key", "--out", "publisher.pem").code == 0
    for _ in range(2):
        _round()
    old = DESIRED.read_bytes()
    # A change and its revert: the document published last says what the old one said.
    (workdir / "trustmgr.yaml").write_text(CONFIG.replace("RENEW", "200h"))
    _round()
    (workdir / "trustmgr.yaml").write_text(CONFIG.replace("RENEW", "240h"))
    _round()
    assert _plan_a1()["action"] == "none"
    ca = (workdir / "out/a1/ca-cert.pem").read_bytes()

    DESIRED.write_bytes(old)
    refused = trustmgr("agent", "run", "--once", "-c", "agent.yaml")
    assert refused.code == 2 and "refusing a replayed document" in refused.err
    row = _plan_a1()
    assert row["action"] == "publish", row
    put_back = json.loads(base64.b64decode(json.loads(old)["payload"]))["sequence"]
    applied = payload((workdir / "out/a1/trustmgr-report.json").read_bytes())["sequence"]
    assert put_back < applied
    assert row["message"] == (
        f"the published sequence {put_back} is older than the {applied} the agent applied: an "
        "older document was put back"
    )
    _round()
    assert _plan_a1()["action"] == "none"
    assert (workdir / "out/a1/ca-cert.pem").read_bytes() == ca
