"""The provider conformance suite: one set of tests every provider passes.

A provider's test module subclasses ``ProviderConformance`` and supplies a
``provider`` fixture (and may override ``supported_algorithms``)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from tests.workload import assert_openssl_enforces_trust_domain
from trustmgr.bundles import TrustBundle
from trustmgr.pki import assemble, check_signed_ca, cluster_ca_request, istiod_problems
from trustmgr.providers import Provider
from trustmgr.providers.keys import KeyAlgorithm

TRUST_DOMAIN = "conformance.test"


class ProviderConformance:
    supported_algorithms: tuple[KeyAlgorithm, ...] = (
        KeyAlgorithm.ECDSA_P256,
        KeyAlgorithm.ECDSA_P384,
        KeyAlgorithm.RSA_2048,
    )

    def test_signs_a_name_constrained_cluster_ca(self, provider: Provider) -> None:
        request = cluster_ca_request(TRUST_DOMAIN, cluster="c1", algorithm=KeyAlgorithm.ECDSA_P256)
        answer = provider.sign_ca(request.csr, timedelta(hours=24))
        root = check_signed_ca(
            answer, request, TRUST_DOMAIN, provider=provider.name, now=datetime.now(UTC)
        )
        assert root in TrustBundle.of(provider.roots())

    def test_ttl_is_honoured_or_shortened(self, provider: Provider) -> None:
        request = cluster_ca_request(TRUST_DOMAIN, cluster="c1", algorithm=KeyAlgorithm.ECDSA_P256)
        before = datetime.now(UTC)
        answer = provider.sign_ca(request.csr, timedelta(hours=2))
        assert answer.chain[0].not_valid_after_utc <= before + timedelta(hours=2, minutes=1)
        assert answer.chain[0].not_valid_after_utc > before + timedelta(minutes=30)

    def test_every_issuance_is_distinct(self, provider: Provider) -> None:
        serials = set()
        for _ in range(3):
            request = cluster_ca_request(
                TRUST_DOMAIN, cluster="c1", algorithm=KeyAlgorithm.ECDSA_P256
            )
            serials.add(provider.sign_ca(request.csr, timedelta(hours=1)).chain[0].serial_number)
        assert len(serials) == 3

    @pytest.mark.parametrize(
        "algorithm", [KeyAlgorithm.ECDSA_P256, KeyAlgorithm.ECDSA_P384, KeyAlgorithm.RSA_2048]
    )
    def test_key_algorithms(self, provider: Provider, algorithm: KeyAlgorithm) -> None:
        if algorithm not in self.supported_algorithms:
            pytest.skip(f"{provider.name} does not sign {algorithm} CSRs")
        request = cluster_ca_request(TRUST_DOMAIN, cluster="c1", algorithm=algorithm)
        answer = provider.sign_ca(request.csr, timedelta(hours=1))
        check_signed_ca(
            answer, request, TRUST_DOMAIN, provider=provider.name, now=datetime.now(UTC)
        )

    def test_istiod_loads_it_and_openssl_enforces_the_trust_domain(
        self, provider: Provider, tmp_path: Path
    ) -> None:
        request = cluster_ca_request(TRUST_DOMAIN, cluster="c1", algorithm=KeyAlgorithm.ECDSA_P256)
        answer = provider.sign_ca(request.csr, timedelta(hours=24))
        root = check_signed_ca(
            answer, request, TRUST_DOMAIN, provider=provider.name, now=datetime.now(UTC)
        )
        material = assemble(request, answer, root, TrustBundle.of(provider.roots()))
        assert istiod_problems(material, now=datetime.now(UTC)) == []
        for name, data in material.files().items():
            (tmp_path / name).write_bytes(data)
        assert_openssl_enforces_trust_domain(tmp_path, TRUST_DOMAIN, "other.test", tmp_path)
