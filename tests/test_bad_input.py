"""Bad input: one clear line, a non-zero exit, no traceback, nothing written."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import PASSPHRASE, snapshot, trustmgr

BASE = """\
stateStore: {file: {path: state}}
providers:
  corp:
    selfSigned: {passphraseEnv: TRUSTMGR_PASSPHRASE}
meshes:
  web:
    trustDomain: web.example
    provider: corp
    clusters:
      web-1: {directory: {path: out/web-1}}
  api:
    trustDomain: api.example
    provider: corp
    clusters:
      api-1: {directory: {path: out/api-1}}
federations:
  - meshes: [web, api]
"""


def edit(old: str, new: str) -> Callable[[Path], None]:
    def apply(workdir: Path) -> None:
        config = workdir / "trustmgr.yaml"
        text = config.read_text()
        assert old in text
        config.write_text(text.replace(old, new))

    return apply


def write(name: str, data: bytes) -> Callable[[Path], None]:
    def apply(workdir: Path) -> None:
        path = workdir / name
        path.chmod(0o600)
        path.write_bytes(data)

    return apply


def new_cluster(workdir: Path) -> None:
    """A cluster added after the first bootstrap: the next run must sign."""
    edit(
        "      api-1: {directory: {path: out/api-1}}",
        "      api-1: {directory: {path: out/api-1}}\n      api-2: {directory: {path: out/api-2}}",
    )(workdir)


BOMB = "".join(
    f"{n}: &{n} [{', '.join([f'*{p}' if p else '0'] * 9)}]\n"
    for p, n in zip(["", *"abcdefgh"], "abcdefghi", strict=True)
)


@dataclass(frozen=True)
class Case:
    id: str
    expect: str
    code: int
    breaks: Callable[[Path], None]
    after_bootstrap: bool = False


def _unset_passphrase(workdir: Path) -> None:
    edit("passphraseEnv: TRUSTMGR_PASSPHRASE", "passphraseEnv: TRUSTMGR_UNSET_VARIABLE")(workdir)


def _wrong_passphrase(workdir: Path) -> None:
    edit("passphraseEnv: TRUSTMGR_PASSPHRASE", "passphraseEnv: OTHER_PASSPHRASE")(workdir)
    new_cluster(workdir)


ROOT_UNIT = "state/providers/corp/root.pem"


def _root_blocks(workdir: Path) -> tuple[bytes, bytes]:
    """The stored root's certificate and encrypted key PEM blocks."""
    unit = (workdir / ROOT_UNIT).read_bytes()
    cut = unit.index(b"-----BEGIN ENCRYPTED PRIVATE KEY-----")
    return unit[:cut], unit[cut:]


def _delete_root_key(workdir: Path) -> None:
    cert, _ = _root_blocks(workdir)
    (workdir / ROOT_UNIT).write_bytes(cert)
    new_cluster(workdir)


def _malformed_root_cert(workdir: Path) -> None:
    _, key = _root_blocks(workdir)
    bad = b"-----BEGIN CERTIFICATE-----\nbm90IGEgY2VydA==\n-----END CERTIFICATE-----\n"
    (workdir / ROOT_UNIT).write_bytes(bad + key)


def _legacy_key_without_cert(workdir: Path) -> None:
    """The two-file form of earlier releases, its certificate lost."""
    _, key = _root_blocks(workdir)
    (workdir / ROOT_UNIT).unlink()
    (workdir / "state/providers/corp/root-key.pem").write_bytes(key)


def _out_is_a_file(workdir: Path) -> None:
    (workdir / "out").write_text("not a directory")


def _lock_held(workdir: Path) -> None:
    import fcntl

    (workdir / "state").mkdir()
    fd = (workdir / "state" / "lock").open("w")
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    _held.append(fd)


_held: list[object] = []


CASES = [
    Case(
        "missing-config",
        "no such file; create one with `trustmgr init`",
        2,
        lambda w: (w / "trustmgr.yaml").unlink(),
    ),
    Case("yaml-syntax", "not valid YAML", 2, edit("  web:\n", "  web: [\n")),
    Case("empty-file", "must hold a mapping", 2, write("trustmgr.yaml", b"")),
    Case(
        "unknown-provider",
        "unknown provider 'vault-prd' (known: corp)",
        2,
        edit(
            "provider: corp\n    clusters:\n      web-1",
            "provider: vault-prd\n    clusters:\n      web-1",
        ),
    ),
    Case(
        "no-meshes",
        "trustmgr.yaml:2: meshes: needs at least 1 entry",
        2,
        write(
            "trustmgr.yaml", b"providers: {corp: {selfSigned: {passphraseEnv: X}}}\nmeshes: {}\n"
        ),
    ),
    Case(
        "dangling-federation",
        "federations[0].meshes[1]: unknown mesh 'apii'",
        2,
        edit("[web, api]", "[web, apii]"),
    ),
    Case(
        "duplicate-trust-domain",
        "trust domain 'web.example' is already used by mesh 'web'",
        2,
        edit("trustDomain: api.example", "trustDomain: web.example"),
    ),
    Case(
        "uppercase-trust-domain",
        "'Web.Example' is not a SPIFFE trust domain",
        2,
        edit("trustDomain: web.example", "trustDomain: Web.Example"),
    ),
    Case(
        "trust-domain-with-scheme",
        "write the trust domain without the scheme: web.example",
        2,
        edit("trustDomain: web.example", "trustDomain: spiffe://web.example"),
    ),
    Case(
        "unknown-key",
        "meshes.web.clusters.web-1.directory.mode: unknown key 'mode'",
        2,
        edit("{path: out/web-1}", "{path: out/web-1, mode: 0600}"),
    ),
    Case(
        "bad-duration",
        "intermediates.ttl: '30days' is not a duration",
        2,
        edit("federations:", "intermediates: {ttl: 30days}\nfederations:"),
    ),
    Case(
        "renew-before-ttl",
        "renewBefore must be shorter than ttl",
        2,
        edit("federations:", "intermediates: {ttl: 24h, renewBefore: 48h}\nfederations:"),
    ),
    Case(
        "duplicate-key",
        "trustmgr.yaml:11: meshes.web.clusters.web-1: duplicate key 'web-1' (also on line 10)",
        2,
        edit(
            "      web-1: {directory: {path: out/web-1}}",
            "      web-1: {directory: {path: out/web-1}}\n      web-1: {directory: {path: out/x}}",
        ),
    ),
    Case(
        "alias-bomb",
        "(at most 10,000 here); use fewer aliases",
        2,
        edit("federations:", BOMB + "federations:"),
    ),
    Case(
        "recursive-alias",
        "trustmgr.yaml:16: a[0]: this alias refers to a value that contains it",
        2,
        edit("federations:", "a: &a [*a]\nfederations:"),
    ),
    Case(
        "not-utf8",
        "trustmgr.yaml:7: not UTF-8 text (byte 0xe9 in column 19); save the file as UTF-8",
        2,
        write("trustmgr.yaml", BASE.encode().replace(b"web.ex", b"w\xe9b.ex")),
    ),
    Case(
        "nul-in-path",
        "trustmgr.yaml:10: meshes.web.clusters.web-1.directory.path: a path cannot hold a NUL",
        2,
        edit("{path: out/web-1}", '{path: "out/web-1\\0"}'),
    ),
    Case(
        "passphrase-instead-of-its-variable",
        "providers.corp.selfSigned.passphraseEnv: must be the name of an environment variable",
        2,
        edit("passphraseEnv: TRUSTMGR_PASSPHRASE", f"passphraseEnv: {PASSPHRASE}"),
    ),
    Case(
        "root-common-name-too-long",
        "trustmgr.yaml:4: providers.corp.selfSigned.subject.commonName: must be at most 64 bytes",
        2,
        edit("{passphraseEnv:", "{subject: {commonName: " + "n" * 65 + "}, passphraseEnv:"),
    ),
    Case(
        "ttl-of-seconds",
        "intermediates.ttl: must be at least 1h",
        2,
        edit("federations:", "intermediates: {ttl: 90s}\nfederations:"),
    ),
    Case(
        "cluster-in-two-meshes",
        "cluster 'web-1' is also in mesh 'web'",
        2,
        edit("api-1: {directory: {path: out/api-1}}", "web-1: {directory: {path: out/other}}"),
    ),
    Case(
        "two-clusters-one-directory",
        "cluster 'web-1' writes to the same directory",
        2,
        edit("api-1: {directory: {path: out/api-1}}", "api-1: {directory: {path: out/web-1}}"),
    ),
    Case(
        "provider-two-kinds",
        "a provider has exactly one kind",
        2,
        edit(
            "    selfSigned: {passphraseEnv: TRUSTMGR_PASSPHRASE}",
            "    selfSigned: {passphraseEnv: TRUSTMGR_PASSPHRASE}\n    vault: {address: http://127.0.0.1:1}",
        ),
    ),
    Case(
        "no-passphrase-source",
        "set passphraseEnv (an environment variable name) or passphraseFile",
        2,
        edit("{passphraseEnv: TRUSTMGR_PASSPHRASE}", "{}"),
    ),
    Case(
        "passphrase-unset",
        "environment variable TRUSTMGR_UNSET_VARIABLE is empty or unset",
        2,
        _unset_passphrase,
    ),
    Case(
        "wrong-passphrase",
        "cannot decrypt the root key; check the passphrase (environment variable OTHER_PASSPHRASE)",
        2,
        _wrong_passphrase,
        after_bootstrap=True,
    ),
    Case(
        "malformed-root-pem",
        "the stored root certificate is not valid PEM",
        2,
        _malformed_root_cert,
        after_bootstrap=True,
    ),
    Case(
        "root-key-lost",
        "root.pem must hold one certificate and one encrypted key; restore it from a backup",
        2,
        _delete_root_key,
        after_bootstrap=True,
    ),
    Case(
        "legacy-root-cert-lost",
        "root-key.pem is stored without root-cert.pem: restore root-cert.pem from a backup",
        2,
        _legacy_key_without_cert,
        after_bootstrap=True,
    ),
    Case(
        "whole-root-lost",
        "clusters api-1, web-1 hold CAs trustmgr issued under root ",
        2,
        lambda w: shutil.rmtree(w / "state/providers/corp"),
        after_bootstrap=True,
    ),
    Case(
        "malformed-state-json",
        "state/state.json is not valid JSON",
        2,
        write("state/state.json", b'{"version": 3,'),
        after_bootstrap=True,
    ),
    Case(
        "state-from-elsewhere",
        "state/state.json: state format 9 is not 2",
        2,
        write("state/state.json", b'{"format": 9}'),
        after_bootstrap=True,
    ),
    Case(
        "output-parent-is-a-file",
        "cannot write out/web-1: out is not a directory",
        1,
        _out_is_a_file,
    ),
    Case(
        "state-locked",
        "another trustmgr run holds state/lock; wait for it to finish",
        1,
        _lock_held,
    ),
]


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input(case: Case, workdir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OTHER_PASSPHRASE", "not " + PASSPHRASE)
    (workdir / "trustmgr.yaml").write_text(BASE)
    if case.after_bootstrap:
        assert trustmgr("bootstrap").code == 0
    case.breaks(workdir)
    before = snapshot(workdir)
    try:
        run = trustmgr("bootstrap")
    finally:
        for fd in _held:
            fd.close()  # type: ignore[attr-defined]
        _held.clear()
    lines = run.err.strip().splitlines()
    assert run.code == case.code, run.err
    assert len(lines) == 1, run.err
    assert lines[0].startswith("trustmgr: ")
    assert case.expect in lines[0]
    assert "Traceback" not in run.err + run.out
    assert PASSPHRASE not in run.err + run.out
    assert snapshot(workdir) == before


def test_all_config_problems_at_once(workdir: Path) -> None:
    text = BASE.replace(
        "provider: corp\n    clusters:\n      web-1", "provider: nope\n    clusters:\n      web-1"
    )
    text = text.replace("[web, api]", "[web, ghost]").replace(
        "{path: out/api-1}", "{path: out/api-1, mode: x}"
    )
    (workdir / "trustmgr.yaml").write_text(text)
    run = trustmgr("validate")
    assert run.code == 2
    lines = run.err.strip().splitlines()
    assert lines == [
        "trustmgr: trustmgr.yaml:8: meshes.web.provider: unknown provider 'nope' (known: corp)",
        "trustmgr: trustmgr.yaml:15: meshes.api.clusters.api-1.directory.mode: unknown key 'mode'",
        "trustmgr: trustmgr.yaml:17: federations[0].meshes[1]: unknown mesh 'ghost'",
    ]


@pytest.mark.parametrize("args", [["--debug", "validate"], ["validate", "--debug"]])
def test_debug_shows_the_traceback_and_keeps_the_exit_code(workdir: Path, args: list[str]) -> None:
    (workdir / "trustmgr.yaml").write_text(BASE.replace("[web, api]", "[web, ghost]"))
    run = trustmgr(*args)
    assert run.code == 2
    assert "Traceback (most recent call last)" in run.err
    assert run.err.rstrip().splitlines()[-1].endswith("unknown mesh 'ghost'")


def test_unused_state_dir_is_not_needed_to_validate(workdir: Path) -> None:
    (workdir / "trustmgr.yaml").write_text(BASE)
    assert trustmgr("validate").code == 0
    assert not (workdir / "state").exists()
    shutil.rmtree(workdir / "out", ignore_errors=True)


def test_verbose_and_debug_never_turn_on_sdk_debug_logs(workdir: Path) -> None:
    """botocore, urllib3, hvac and kubernetes log headers and bodies (tokens,
    keys) at DEBUG: -vv and --debug raise only trustmgr's own loggers."""
    import logging

    (workdir / "trustmgr.yaml").write_text(BASE)
    assert trustmgr("-vv", "--debug", "validate").code == 0
    for sdk in ("botocore", "boto3", "urllib3", "hvac", "kubernetes"):
        assert logging.getLogger(sdk).getEffectiveLevel() >= logging.WARNING
    assert logging.getLogger("trustmgr").getEffectiveLevel() == logging.DEBUG


def test_material_repr_carries_no_key(quickstart: Path, workdir: Path) -> None:
    from trustmgr.targets.directory import DirectoryTarget

    assert trustmgr("-c", str(quickstart), "bootstrap").code == 0
    material = DirectoryTarget(workdir / "out" / "web-east", cluster="web-east").read()
    assert material is not None and b"PRIVATE KEY" in material.ca_key
    assert "PRIVATE KEY" not in repr(material)


@pytest.mark.parametrize(
    ("domain", "why"),
    [(".example", "a leading dot would permit every subdomain"), ("a..example", "empty label")],
)
def test_trust_domain_labels(workdir: Path, domain: str, why: str) -> None:
    (workdir / "trustmgr.yaml").write_text(BASE.replace("web.example", domain))
    run = trustmgr("validate")
    assert run.code == 2, why
    assert "is not a SPIFFE trust domain" in run.err


@pytest.mark.parametrize(
    ("args", "expect"),
    [
        (
            ("trust", "graph", "-f", "svg", "--out", "no/such/dir/g.svg"),
            "cannot write no/such/dir/g.svg",
        ),
        (
            ("bundle", "export", "--mesh", "web", "--out", "no/such/dir/b.json"),
            "cannot write no/such/dir/b.json",
        ),
        (("-c", "no/such/dir/trustmgr.yaml", "init"), "cannot write no/such/dir/trustmgr.yaml"),
    ],
)
def test_unwritable_outputs_are_one_line(workdir: Path, args: tuple[str, ...], expect: str) -> None:
    (workdir / "trustmgr.yaml").write_text(BASE)
    assert trustmgr("bootstrap").code == 0
    state = (workdir / "state" / "state.json").read_bytes()
    run = trustmgr(*args)
    assert run.code == 1
    assert run.err.startswith(f"trustmgr: {expect}"), run.err
    assert "unexpected" not in run.err
    assert (workdir / "state" / "state.json").read_bytes() == state  # no bundle sequence bumped


def test_too_long_a_duration_is_a_config_error(workdir: Path) -> None:
    (workdir / "trustmgr.yaml").write_text(
        BASE.replace("federations:", "intermediates: {ttl: 5000000d}\nfederations:")
    )
    run = trustmgr("validate")
    assert run.code == 2
    assert "intermediates.ttl: '5000000d' is longer than 100 years" in run.err


def test_validate_asks_no_provider_anything(workdir: Path) -> None:
    """validate checks the file only: a dead Vault address is found by plan, not here."""
    text = BASE.replace(
        "    selfSigned: {passphraseEnv: TRUSTMGR_PASSPHRASE}",
        "    vault: {address: 'http://127.0.0.1:9', auth: {token: {env: NO_TOKEN_HERE}}}",
    )
    (workdir / "trustmgr.yaml").write_text(text)
    run = trustmgr("validate")
    assert run.code == 0, run.err
    assert "meshes web and api share provider corp" not in run.err  # they are federated
