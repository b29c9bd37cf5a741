"""A root CA that trustmgr creates on first use and keeps, encrypted, in a BlobStore."""

from __future__ import annotations

import logging
import re
import threading
from datetime import timedelta

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.asymmetric.types import CertificateIssuerPrivateKeyTypes
from cryptography.x509.oid import NameOID

from trustmgr.errors import StateError
from trustmgr.providers import keyseal
from trustmgr.providers.base import (
    BACKDATE,
    BlobStore,
    Clock,
    ProviderNeedsFixError,
    SignedCA,
    read_secret,
)
from trustmgr.providers.config import SelfSignedConfig
from trustmgr.providers.keys import KeyAlgorithm, ca_key_usage, key_algorithm_of

_COPIED_FROM_CSR = (x509.SubjectAlternativeName, x509.NameConstraints)

ROOT = "root.pem"
"""The root certificate and its encrypted key, one file written in one step."""
LEGACY_CERT, LEGACY_KEY = "root-cert.pem", "root-key.pem"
"""The two-file form of earlier releases, still read."""

_Root = tuple[x509.Certificate, CertificateIssuerPrivateKeyTypes]

log = logging.getLogger(__name__)


class SelfSignedProvider:
    """Signs cluster CA CSRs with a root it owns.

    The root is stored as ``<name>/root.pem``: the certificate, then the key as
    encrypted PKCS#8, in one file written atomically, so a crash can never keep
    one without the other. The passphrase comes from the environment or a file,
    never from the configuration.
    """

    def __init__(self, name: str, config: SelfSignedConfig, store: BlobStore, clock: Clock) -> None:
        self.name = name
        self._config = config
        self._store = store
        self._clock = clock
        self._root: _Root | None = None
        self._prepared: _Root | None = None
        self._reseal_lock = threading.Lock()
        self._resealed = False

    def _passphrase(self) -> bytes:
        cfg = self._config
        return read_secret(
            f"provider {self.name}: root key passphrase",
            env=cfg.passphrase_env,
            file=cfg.passphrase_file,
        ).encode()

    def _stored(self) -> tuple[x509.Certificate, bytes | None] | None:
        """The stored root certificate and its encrypted key (None if missing)."""
        unit = self._store.load(f"{self.name}/{ROOT}")
        if unit is not None:
            certs, keys = _split(unit)
            if len(certs) != 1 or len(keys) != 1:
                raise ProviderNeedsFixError(
                    f"provider {self.name}: {ROOT} must hold one certificate and one encrypted "
                    "key; restore it from a backup"
                )
            return _load_cert(self.name, certs[0]), keys[0]
        cert = self._store.load(f"{self.name}/{LEGACY_CERT}")
        key = self._store.load(f"{self.name}/{LEGACY_KEY}")
        if cert is None:
            if key is not None:
                raise ProviderNeedsFixError(
                    f"provider {self.name}: {LEGACY_KEY} is stored without {LEGACY_CERT}: restore "
                    f"{LEGACY_CERT} from a backup"
                )
            return None
        return _load_cert(self.name, cert), key

    def roots(self) -> tuple[x509.Certificate, ...]:
        stored = self._stored()
        return (stored[0],) if stored else ()

    def has_root(self) -> bool:
        return bool(self.roots())

    def prepare_root(self) -> x509.Certificate:
        if self._prepared is None:
            self._prepared = self._new_root()
        return self._prepared[0]

    def keep_prepared_root(self) -> x509.Certificate:
        if self.has_root():
            raise ProviderNeedsFixError(f"provider {self.name}: a root already exists")
        self.prepare_root()
        assert self._prepared is not None
        cert, key = self._prepared
        encrypted = keyseal.seal(key, self._passphrase())
        unit = cert.public_bytes(serialization.Encoding.PEM) + encrypted
        self._store.save(f"{self.name}/{ROOT}", unit, secret=True)
        self._root, self._prepared = self._prepared, None
        return cert

    def create_root(self) -> x509.Certificate:
        """Make and store a root. Refuses if one exists."""
        if self.has_root():
            raise ProviderNeedsFixError(f"provider {self.name}: a root already exists")
        self._passphrase()  # before the key is made: a missing secret costs nothing
        self.prepare_root()
        return self.keep_prepared_root()

    def _new_root(self) -> _Root:
        cfg = self._config
        key = cfg.key_algorithm.generate()
        subject_attrs = [x509.NameAttribute(NameOID.COMMON_NAME, cfg.subject.common_name)]
        for oid, value in (
            (NameOID.ORGANIZATIONAL_UNIT_NAME, cfg.subject.organizational_unit),
            (NameOID.ORGANIZATION_NAME, cfg.subject.organization),
            (NameOID.COUNTRY_NAME, cfg.subject.country),
        ):
            if value:
                subject_attrs.insert(0, x509.NameAttribute(oid, value))
        subject = x509.Name(subject_attrs)
        now = self._clock()
        cert = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - BACKDATE)
            .not_valid_after(now + cfg.ttl)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(ca_key_usage(digital_signature=False), critical=True)
            .add_extension(
                x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False
            )
            .sign(key, cfg.key_algorithm.signature_hash())
        )
        return cert, key

    def _load_root(self) -> _Root:
        if self._root is not None:
            return self._root
        stored = self._stored()
        if stored is None:
            self.create_root()
            assert self._root is not None
            return self._root
        cert, data = stored
        if data is None:
            raise ProviderNeedsFixError(
                f"provider {self.name}: the root certificate exists but its key is missing; "
                f"restore {LEGACY_KEY} from a backup"
            )
        try:
            key = keyseal.unseal(data, self._passphrase())
        except keyseal.SealFormatError as exc:
            raise ProviderNeedsFixError(
                f"provider {self.name}: cannot read the root key: {exc}; restore {ROOT} from a "
                "backup"
            ) from None
        except keyseal.UnsealError:
            raise ProviderNeedsFixError(
                f"provider {self.name}: cannot decrypt the root key; check the passphrase "
                f"({self._passphrase_source()}) or restore {ROOT} from a backup"
            ) from None
        if (
            not isinstance(key, ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey)
            or key_algorithm_of(key) is None
        ):
            raise ProviderNeedsFixError(
                f"provider {self.name}: the root key is of an unsupported type"
            )
        if cert.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        ) != key.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        ):
            raise ProviderNeedsFixError(
                f"provider {self.name}: the stored root key does not match the root certificate"
            )
        self._root = (cert, key)
        return self._root

    def _reseal_once(self) -> None:
        """Store the unlocked root as one unit sealed at the current cost, if it
        is not yet; once per provider, on the first signing, so under the run's
        lock. A failure leaves the stored root as it was, still usable."""
        with self._reseal_lock:
            if self._resealed:
                return
            self._resealed = True
            try:
                self._reseal()
            except StateError as exc:
                log.warning(
                    "provider %s: sealing the root key again did not finish; a later run finishes it: %s",
                    self.name,
                    exc,
                )

    def _reseal(self) -> None:
        assert self._root is not None
        cert, key = self._root
        cert_pem = cert.public_bytes(serialization.Encoding.PEM)
        unit_name = f"{self.name}/{ROOT}"
        unit = self._store.load(unit_name)
        if unit is not None:
            certs, keys = _split(unit)
            if not _holds(certs, cert):
                return  # not the root just unlocked: never overwritten here
        if unit is None or len(keys) != 1 or not _sealed_current(keys[0]):
            passphrase = self._passphrase()
            sealed = keyseal.seal(key, passphrase)
            if not _unseals_to(sealed, passphrase, key):
                raise StateError(f"{unit_name}: the key sealed again does not decrypt to itself")
            unit = cert_pem + sealed
            self._store.save(unit_name, unit, secret=True)
            if self._store.load(unit_name) != unit:
                raise StateError(f"{unit_name} does not read back as written")
            log.info("provider %s: root key sealed as %s", self.name, keyseal.describe(sealed))
        # the key first: should the run stop between the two, no copy of the key
        # sealed the earlier way is left, and the certificate is removed next time
        legacy_key = self._store.load(f"{self.name}/{LEGACY_KEY}")
        if legacy_key is not None and _unseals_to(legacy_key, self._passphrase(), key):
            self._store.delete(f"{self.name}/{LEGACY_KEY}")
        legacy_cert = self._store.load(f"{self.name}/{LEGACY_CERT}")
        if legacy_cert is not None and _holds(_split(legacy_cert)[0], cert):
            self._store.delete(f"{self.name}/{LEGACY_CERT}")

    def unlock(self) -> None:
        if self.has_root():
            self._load_root()
        else:
            self._passphrase()

    def _passphrase_source(self) -> str:
        if self._config.passphrase_env:
            return f"environment variable {self._config.passphrase_env}"
        return f"passphraseFile {self._config.passphrase_file}"

    def sign_ca(self, csr: x509.CertificateSigningRequest, ttl: timedelta) -> SignedCA:
        root, key = self._load_root()
        self._reseal_once()
        if not csr.is_signature_valid:
            raise ProviderNeedsFixError(f"provider {self.name}: the CSR's signature is invalid")
        now = self._clock()
        not_after = min(now + ttl, root.not_valid_after_utc)
        algorithm = key_algorithm_of(key) or KeyAlgorithm.ECDSA_P256
        builder = (
            x509.CertificateBuilder()
            .subject_name(csr.subject)
            .issuer_name(root.subject)
            .public_key(csr.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(max(now - BACKDATE, root.not_valid_before_utc))
            .not_valid_after(not_after)
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(ca_key_usage(), critical=True)
            .add_extension(
                x509.SubjectKeyIdentifier.from_public_key(csr.public_key()), critical=False
            )
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(key.public_key()), critical=False
            )
        )
        for ext in csr.extensions:
            if isinstance(ext.value, _COPIED_FROM_CSR):
                builder = builder.add_extension(ext.value, critical=ext.critical)
        cert = builder.sign(key, algorithm.signature_hash())
        return SignedCA(chain=(cert,), roots=(root,))


def _split(unit: bytes) -> tuple[list[bytes], list[bytes]]:
    """The PEM certificates and encrypted keys of a stored unit."""
    certs: list[bytes] = []
    keys: list[bytes] = []
    for match in re.finditer(rb"-----BEGIN ([A-Z ]+)-----.+?-----END \1-----\r?\n?", unit, re.S):
        kind = match.group(1)
        if kind == b"CERTIFICATE":
            certs.append(match.group(0))
        elif kind == b"ENCRYPTED PRIVATE KEY":
            keys.append(match.group(0))
    return certs, keys


def _holds(certs: list[bytes], cert: x509.Certificate) -> bool:
    try:
        return len(certs) == 1 and x509.load_pem_x509_certificate(certs[0]) == cert
    except ValueError:
        return False


def _sealed_current(key: bytes) -> bool:
    try:
        return keyseal.describe(key).current
    except keyseal.SealFormatError:
        return False


def _unseals_to(data: bytes, passphrase: bytes, key: CertificateIssuerPrivateKeyTypes) -> bool:
    try:
        found = keyseal.unseal(data, passphrase)
    except keyseal.UnsealError:
        return False
    spki = serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    return found.public_key().public_bytes(*spki) == key.public_key().public_bytes(*spki)


def _load_cert(provider: str, data: bytes) -> x509.Certificate:
    try:
        return x509.load_pem_x509_certificate(data)
    except ValueError:
        raise ProviderNeedsFixError(
            f"provider {provider}: the stored root certificate is not valid PEM; "
            "restore it from a backup"
        ) from None
