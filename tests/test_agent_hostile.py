"""Hostile content in an agent-mode cluster's exchange, which parties weaker than
the cluster's cacerts can write: numbers past any range, deep nesting, wrong
types, certificates issuing each other, text carrying lines of its own. Each is
that cluster's problem, said in one line; the pass finishes, and the other
clusters are planned and written as usual."""

from __future__ import annotations

import base64
import json
import logging
import os
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from tests import test_agent
from tests.agent_reports import payload, rewrite, rewrite_text
from tests.conftest import REPO, Run, snapshot, trustmgr
from tests.test_agent import CONFIG, _agent
from trustmgr.agent.document import (
    MAX_BUNDLE,
    MAX_CHAIN,
    MAX_ERROR,
    MAX_NESTING,
    MAX_NUMBER,
    MAX_PROBLEMS,
)

fleet = test_agent.fleet
"""A converged fleet: a-1 written centrally, a-2, a-3 and b-1 by their agents."""
HOSTILE = "a-2"
"""The cluster whose report is hostile; a-3's published document is tampered with."""
FORGED = "FORGED"
"""Marks text an attacker means to show as a line of its own."""


def _report(fleet: Path, cluster: str = HOSTILE) -> Path:
    return fleet / "out" / cluster / "trustmgr-report.json"


def _set(fleet: Path, **fields: Any) -> None:
    """Fields of the hostile cluster's report set to what a hostile agent chooses."""
    rewrite(fleet / "out" / HOSTILE, lambda report: report.update(fields))


def _rows(run: Run, code: int = 0) -> dict[str, dict[str, Any]]:
    assert run.code == code, run.out + run.err
    data = json.loads(run.out)
    rows = data["clusters"] if isinstance(data, dict) else data
    return {row["cluster"]: row for row in rows}


def _others_go_on(fleet: Path, code: int = 0) -> dict[str, dict[str, Any]]:
    """With federation ended every cluster has something to do: the pass finishes
    (exit ``code``) and writes the clusters that are not hostile as usual. The plan
    after it (exit ``code`` too), by cluster."""
    (fleet / "trustmgr.yaml").write_text(CONFIG.replace("FEDERATIONS", ""))
    run = trustmgr("reconcile", "-o", "json")
    assert run.code == code, run.out + run.err
    done = {c["cluster"]: c for c in json.loads(run.out)["clusters"]}
    assert done["a-1"]["action"] == "update-bundle" and done["a-1"]["ok"]
    assert all(done[c]["action"] == "publish" and done[c]["ok"] for c in ("a-3", "b-1"))
    assert (fleet / "out/a-1/root-cert.pem").read_text().count("BEGIN CERTIFICATE") == 1
    return _rows(trustmgr("plan", "-o", "json"), code)


def _one_line(text: str, *fragments: str) -> None:
    assert "\n" not in text and "\x1b" not in text and text.isprintable(), repr(text)
    for fragment in fragments:
        assert fragment in text, text


def _unreadable_report(fleet: Path, why: str) -> None:
    """The hostile cluster waits for its agent to write its report again, saying ``why``
    in one line, in the plan and in the status; the other clusters go on."""
    plan = _others_go_on(fleet)
    row = plan[HOSTILE]
    assert (row["action"], row["reason"]) == ("await-agent", "ReportUnreadable"), row
    _one_line(row["message"], "not a trustmgr agent report", why)
    drift = _rows(trustmgr("status", "-o", "json"))[HOSTILE]["drift"]
    _one_line(drift, why)


@pytest.mark.parametrize(
    "number",
    ["1e400", "1.5", "-1", '"7"', "true", "null", str(MAX_NUMBER)],
)
def test_a_report_sequence_that_is_no_sequence_fails_its_cluster_only(
    fleet: Path, number: str
) -> None:
    before = _report(fleet).read_bytes()
    rewrite_text(
        fleet / "out" / HOSTILE,
        lambda text: text.replace('"sequence": ', f'"sequence": {number}, "was": ', 1),
    )
    assert _report(fleet).read_bytes() != before
    _unreadable_report(fleet, "sequence is not a whole number from 0 to")


@pytest.mark.parametrize(
    ("fields", "why"),
    [
        ({"cluster": 7}, "cluster is not a string"),
        ({"error": {"a": 1}}, "error is not a string"),
        ({"problems": 7}, "problems is not a list of strings"),
        ({"problems": [1]}, "problems is not a list of strings"),
        ({"caCert": ["a"]}, "caCert is not a string"),
        ({"reportedAt": 5}, "reportedAt is not a string"),
        ({"reportedAt": "2024-05-01T10:00:00"}, "reportedAt has no time zone"),
    ],
)
def test_a_report_field_of_the_wrong_type_fails_its_cluster_only(
    fleet: Path, fields: dict[str, Any], why: str
) -> None:
    _set(fleet, **fields)
    _unreadable_report(fleet, why)


def test_a_deeply_nested_report_fails_its_cluster_only(fleet: Path) -> None:
    _report(fleet).write_text("[" * 100_000 + "]" * 100_000)
    _unreadable_report(fleet, f"nested deeper than {MAX_NESTING}")


def test_a_report_nested_below_the_recursion_limit_fails_its_cluster_only(fleet: Path) -> None:
    deep: list[Any] = []
    for _ in range(200):
        deep = [deep]
    _set(fleet, phase=deep)
    _unreadable_report(fleet, f"nested deeper than {MAX_NESTING}")


def _copies(fleet: Path, name: str, count: int) -> str:
    """``count`` PEM certificates: the cluster's own, again and again."""
    cert = (fleet / "out" / HOSTILE / name).read_text()
    block = cert[: cert.index("-----END CERTIFICATE-----") + len("-----END CERTIFICATE-----\n")]
    return block * count


@pytest.mark.parametrize(
    ("field", "source", "count", "most"),
    [
        ("certChain", "cert-chain.pem", MAX_CHAIN + 1, MAX_CHAIN),
        ("caCert", "ca-cert.pem", MAX_CHAIN + 1, MAX_CHAIN),
        ("rootCert", "root-cert.pem", MAX_BUNDLE + 1, MAX_BUNDLE),
        ("csr", "ca-cert.pem", 2, 1),
    ],
)
def test_a_report_with_too_many_certificates_fails_its_cluster_only(
    fleet: Path, field: str, source: str, count: int, most: int
) -> None:
    _set(fleet, **{field: _copies(fleet, source, count)})
    _unreadable_report(fleet, f"{field} holds more than {most} PEM blocks")


def _tamper(fleet: Path, payload: bytes | None = None, **envelope: Any) -> None:
    """a-3's published document changed by a writer of the exchange."""
    path = fleet / "out/a-3/trustmgr-desired.json"
    data = json.loads(path.read_text())
    if payload is not None:
        data["payload"] = base64.b64encode(payload).decode()
    path.write_text(json.dumps({**data, **envelope}))


def _published(fleet: Path) -> dict[str, Any]:
    path = fleet / "out/a-3/trustmgr-desired.json"
    loaded: dict[str, Any] = json.loads(base64.b64decode(json.loads(path.read_text())["payload"]))
    return loaded


def _republished(fleet: Path, why: str) -> None:
    """The central run publishes a-3's document again, saying ``why`` in one line,
    and its agent accepts what it published."""
    row = _rows(trustmgr("plan", "-o", "json"))["a-3"]
    assert (row["action"], row["reason"]) == ("publish", "Publish"), row
    _one_line(row["message"], why)
    plan = _others_go_on(fleet)
    assert plan["a-3"]["action"] == "await-agent", plan["a-3"]
    assert _published(fleet)["sequence"] > 0
    assert _agent(fleet, "a-3")[0] == 0


def test_a_published_document_with_a_huge_sequence_is_published_again(fleet: Path) -> None:
    raw = json.dumps(_published(fleet)).replace('"sequence": ', '"sequence": 1e400, "was": ')
    _tamper(fleet, raw.encode())
    _republished(fleet, "does not verify")


def test_a_deeply_nested_published_document_is_published_again(fleet: Path) -> None:
    (fleet / "out/a-3/trustmgr-desired.json").write_text("[" * 100_000 + "]" * 100_000)
    _republished(fleet, "not a signed trustmgr desired document")


def test_a_published_document_naming_its_key_with_lines_is_published_again(fleet: Path) -> None:
    _tamper(fleet, key=f"0\n{FORGED} a-1 a ok")
    assert FORGED not in trustmgr("plan").out
    _republished(fleet, "not a signed trustmgr desired document")


def _no_line_injected(out: str, markers: int) -> None:
    """``FORGED`` appears ``markers`` times in ``out``, only in the hostile cluster's
    lines; no escape sequence reaches the terminal."""
    assert "\x1b" not in out, out
    lines = [line for line in out.splitlines() if FORGED in line]
    assert len(lines) == markers, out
    assert all(line.split()[0] == HOSTILE for line in lines), out


@pytest.mark.parametrize(
    ("fields", "plan_lines", "status_lines"),
    [
        ({"error": f"x\n{FORGED} a-9 a none UpToDate\n\x1b[2K\r4 clusters: 0 changed"}, 1, 1),
        ({"foreign": f"y\r\n{FORGED} a-9 a none UpToDate\x1b]0;title\x07"}, 1, 0),
        ({"problems": [f"ca-key.pem\n{FORGED} a-9 a none UpToDate\u2028x\x00"]}, 1, 1),
    ],
    ids=["error", "foreign", "problems"],
)
def test_text_from_an_agent_is_one_line_of_printable_characters(
    fleet: Path, fields: dict[str, Any], plan_lines: int, status_lines: int
) -> None:
    _set(fleet, **fields)
    plan = trustmgr("plan")
    assert plan.code == 0, plan.err
    _no_line_injected(plan.out, plan_lines)
    _one_line(_rows(trustmgr("plan", "-o", "json"))[HOSTILE]["message"], FORGED)
    status = trustmgr("status")
    assert status.code == 0, status.err
    _no_line_injected(status.out, status_lines)


def test_a_long_error_and_many_problems_are_cut_short(fleet: Path) -> None:
    _set(fleet, error="e" * 100_000, problems=[f"p{i}" for i in range(5000)])
    message = _rows(trustmgr("plan", "-o", "json"))[HOSTILE]["message"]
    assert len(message) == MAX_ERROR and message.endswith("…")
    verify = trustmgr("verify").out.splitlines()
    assert 0 < len([line for line in verify if line.startswith(f"FAIL {HOSTILE}:")]) <= MAX_PROBLEMS


def _ec_cert(
    subject: x509.Name, issuer: x509.Name, key: ec.EllipticCurvePrivateKey, public: Any, serial: int
) -> bytes:
    now = datetime.now(UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(public)
        .serial_number(serial)
        .not_valid_before(now - timedelta(days=1))
        .not_valid_after(now + timedelta(days=30))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    return cert.public_bytes(serialization.Encoding.PEM)


def _mutual_chain(fleet: Path, count: int) -> tuple[str, str]:
    """A CA certificate, and a chain of ``count``: it, certificates that all issue
    each other (one name, one key), and the mesh's root. A path search that tries
    every order of them tries exponentially many."""
    root = _copies(fleet, "root-cert.pem", 1).encode()
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "Mutual")])
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "Cluster CA")])
    other = ec.generate_private_key(ec.SECP256R1()).public_key()
    ca = _ec_cert(ca_name, name, key, other, 1)
    mutual = [_ec_cert(name, name, key, key.public_key(), 100 + i) for i in range(count - 2)]
    return ca.decode(), b"".join([ca, *mutual, root]).decode()


def _cli(fleet: Path, *args: str) -> Run:
    """The CLI in a process of its own, given 20 seconds: a hang fails, it does not hang."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), *filter(None, [env.get("PYTHONPATH")])])
    try:
        done = subprocess.run(
            [sys.executable, "-m", "trustmgr", *args],
            cwd=fleet,
            env=env,
            capture_output=True,
            text=True,
            check=False,
            timeout=20,
        )
    except subprocess.TimeoutExpired:
        pytest.fail(f"trustmgr {' '.join(args)} did not finish in 20 seconds")
    return Run(done.returncode, done.stdout, done.stderr)


@pytest.mark.parametrize(
    ("count", "why"),
    [
        (MAX_CHAIN, "signature checks, where Go's verifier gives up"),
        (MAX_CHAIN + 2, f"certChain holds more than {MAX_CHAIN} PEM blocks"),
    ],
)
def test_certificates_issuing_each_other_do_not_hang_the_pass(
    fleet: Path, count: int, why: str
) -> None:
    ca, chain = _mutual_chain(fleet, count)
    _set(fleet, caCert=ca, certChain=chain)
    plan = _rows(_cli(fleet, "plan", "-o", "json"))
    assert plan[HOSTILE]["action"] == "await-agent"
    _one_line(plan[HOSTILE]["message"], why)
    drift = _rows(_cli(fleet, "status", "-o", "json"))[HOSTILE]["drift"]
    _one_line(drift, why)
    (fleet / "trustmgr.yaml").write_text(CONFIG.replace("FEDERATIONS", ""))
    run = _cli(fleet, "reconcile", "-o", "json")
    done = {c: row["action"] for c, row in _rows(run).items()}
    assert done == {"a-1": "update-bundle", "a-2": "publish", "a-3": "publish", "b-1": "publish"}


def test_a_bug_met_reading_one_exchange_fails_that_cluster_only(
    fleet: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    from trustmgr.pki import observe_public

    def broken(*args: Any, **kwargs: Any) -> Any:
        material = args[0]
        if material.ca_cert == (fleet / "out" / HOSTILE / "ca-cert.pem").read_bytes():
            raise KeyError(f"{FORGED} content of the exchange")
        return observe_public(*args, **kwargs)

    monkeypatch.setattr("trustmgr.observe.observe_public", broken)
    caplog.set_level(logging.DEBUG, logger="trustmgr")
    plan = _others_go_on(fleet, code=1)
    row = plan[HOSTILE]
    assert row["action"] == "fail", row
    _one_line(row["message"], f"cluster {HOSTILE}: its exchange could not be read", "KeyError")
    assert FORGED not in row["message"]
    assert plan["a-3"]["action"] == "await-agent"  # published, as b-1
    warnings = [
        r for r in caplog.records if r.levelno >= logging.WARNING and HOSTILE in r.getMessage()
    ]
    assert warnings and all(FORGED not in r.getMessage() for r in warnings)
    assert any(r.exc_info for r in caplog.records if r.levelno == logging.DEBUG)


def test_an_agent_failing_with_a_long_error_reports_it_once(workdir: Path) -> None:
    """The report an agent would write is the one there when nothing changed,
    however long its error: the exchange is not written again every pass."""
    (workdir / "trustmgr.yaml").write_text(CONFIG.replace("FEDERATIONS", ""))
    assert trustmgr("agent", "publisher-key", "--out", "publisher.pem").code == 0
    long = "/".join(["d" * 200] * 3)  # no desired document there: the error names the path
    (workdir / "agent.yaml").write_text(
        f"cluster: a-9\npublisherKeyFile: publisher.pem\ndirectory: {{path: {long}}}\n"
    )
    run = trustmgr("agent", "run", "--once", "-c", "agent.yaml")
    assert run.code == 2 and long in run.err, run.err
    report = payload((workdir / long / "trustmgr-report.json").read_bytes())
    assert len(report["error"]) == MAX_ERROR, report["error"]
    before = snapshot(workdir / long)
    assert trustmgr("agent", "run", "--once", "-c", "agent.yaml").code == 2
    assert snapshot(workdir / long) == before
