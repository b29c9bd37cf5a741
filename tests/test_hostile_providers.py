"""Hostile providers: each answers every CSR with a certificate or chain that
breaks one rule (tests/conformance.py, ``HOSTILE``). trustmgr must refuse the
answer naming that rule, both when the check is called directly and when
``trustmgr bootstrap`` meets it: the cluster fails, the run exits 1, and nothing
reaches the target directory or the state."""

from __future__ import annotations

import json
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from tests.conformance import (
    HONEST,
    HOSTILE,
    TRUST_DOMAIN,
    Hostile,
    HostileProvider,
    Upstream,
)
from tests.conftest import Run, trustmgr
from trustmgr.bundles import TrustBundle, load_certificates
from trustmgr.config import Config
from trustmgr.engine import Workspace
from trustmgr.errors import ProviderAnswerError
from trustmgr.pki import (
    CACERTS_FILES,
    assemble,
    check_signed_ca,
    cluster_ca_request,
    istiod_problems,
)
from trustmgr.providers.keys import KeyAlgorithm
from trustmgr.state.file import FileStateStore

CONFIG = f"""\
stateStore: {{file: {{path: state}}}}
providers:
  hostile: {{selfSigned: {{passphraseEnv: TRUSTMGR_PASSPHRASE}}}}
meshes:
  m:
    trustDomain: {TRUST_DOMAIN}
    provider: hostile
    clusters:
      c1: {{directory: {{path: out/c1}}}}
"""


def hostile_provider(hostile: Hostile) -> HostileProvider:
    def clock() -> datetime:
        return datetime.now(UTC)

    return HostileProvider(hostile, Upstream.create(clock()), clock)


@pytest.mark.parametrize("hostile", HOSTILE, ids=lambda h: h.id)
def test_the_check_refuses_the_answer_naming_the_rule(hostile: Hostile) -> None:
    provider = hostile_provider(hostile)
    request = cluster_ca_request(TRUST_DOMAIN, cluster="c1", algorithm=KeyAlgorithm.ECDSA_P256)
    answer = provider.sign_ca(request.csr, timedelta(hours=24))
    with pytest.raises(ProviderAnswerError) as info:
        check_signed_ca(answer, request, TRUST_DOMAIN, provider="hostile", now=datetime.now(UTC))
    assert str(info.value) == provider.refusal


def test_the_same_pki_answering_well_is_accepted() -> None:
    provider = hostile_provider(HONEST)
    request = cluster_ca_request(TRUST_DOMAIN, cluster="c1", algorithm=KeyAlgorithm.ECDSA_P256)
    answer = provider.sign_ca(request.csr, timedelta(hours=24))
    now = datetime.now(UTC)
    root = check_signed_ca(answer, request, TRUST_DOMAIN, provider="hostile", now=now)
    assert root == provider.upstream.root.cert
    material = assemble(request, answer, root, TrustBundle.of(provider.roots()))
    assert istiod_problems(material, now=now) == []


@pytest.fixture
def bootstrap(workdir: Path, monkeypatch: pytest.MonkeyPatch) -> Callable[[HostileProvider], Run]:
    """``trustmgr bootstrap -o json`` on a one-cluster directory-target config
    whose provider ``hostile`` is replaced, through ``Workspace.build``'s
    ``providers`` seam, by the one given."""
    (workdir / "trustmgr.yaml").write_text(CONFIG)
    build = Workspace.build

    def run(provider: HostileProvider) -> Run:
        def build_with(config: Config, **kwargs: Any) -> Workspace:
            return build(config, **{**kwargs, "providers": {provider.name: provider}})

        monkeypatch.setattr(Workspace, "build", build_with)
        return trustmgr("bootstrap", "-o", "json")

    return run


def written(workdir: Path) -> list[str]:
    """Every path under ``workdir`` but the configuration and the state store."""
    return sorted(
        str(p.relative_to(workdir))
        for p in workdir.rglob("*")
        if p.name != "trustmgr.yaml" and p.relative_to(workdir).parts[0] != "state"
    )


@pytest.mark.parametrize("hostile", HOSTILE, ids=lambda h: h.id)
def test_bootstrap_fails_the_cluster_and_writes_nothing(
    hostile: Hostile, workdir: Path, bootstrap: Callable[[HostileProvider], Run]
) -> None:
    provider = hostile_provider(hostile)
    run = bootstrap(provider)

    assert run.code == 1, run.err
    assert provider.refusal is not None  # the provider was asked
    report = json.loads(run.out)
    assert (report["ok"], report["changed"]) == (False, False)
    [cluster] = report["clusters"]
    assert (cluster["cluster"], cluster["action"], cluster["ok"]) == ("c1", "issue", False)
    assert cluster["error"] == provider.refusal
    assert written(workdir) == []  # no cacerts files, no stamp directories, no out/c1
    assert FileStateStore(workdir / "state").load().clusters == {}


def test_bootstrap_writes_the_same_pki_answering_well(
    workdir: Path, bootstrap: Callable[[HostileProvider], Run]
) -> None:
    """The control: the same config, PKI and seam write the cluster."""
    provider = hostile_provider(HONEST)
    run = bootstrap(provider)

    assert run.code == 0, run.err
    assert json.loads(run.out)["ok"] is True
    target = workdir / "out" / "c1"
    assert all((target / name).is_file() for name in CACERTS_FILES)
    chain = load_certificates((target / "cert-chain.pem").read_bytes(), "cert-chain.pem")
    assert chain[1:] == [
        provider.upstream.issuing.cert,
        provider.upstream.upper.cert,
        provider.upstream.root.cert,
    ]
    assert "c1" in FileStateStore(workdir / "state").load().clusters
