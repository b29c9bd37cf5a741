"""A root CA that trustmgr creates on first use and keeps, encrypted, in a BlobStore."""

from __future__ import annotations

from datetime import timedelta

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.asymmetric.types import CertificateIssuerPrivateKeyTypes
from cryptography.x509.oid import NameOID

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

ROOT_CERT = "root-cert.pem"
ROOT_KEY = "root-key.pem"


class SelfSignedProvider:
    """Signs cluster CA CSRs with a root it owns.

    The root key is stored as encrypted PKCS#8 under ``<name>/root-key.pem``;
    the passphrase comes from the environment or a file, never from the config.
    """

    def __init__(self, name: str, config: SelfSignedConfig, store: BlobStore, clock: Clock) -> None:
        self.name = name
        self._config = config
        self._store = store
        self._clock = clock
        self._root: tuple[x509.Certificate, CertificateIssuerPrivateKeyTypes] | None = None

    def _passphrase(self) -> bytes:
        cfg = self._config
        return read_secret(
            f"provider {self.name}: root key passphrase",
            env=cfg.passphrase_env,
            file=cfg.passphrase_file,
        ).encode()

    def roots(self) -> tuple[x509.Certificate, ...]:
        data = self._store.load(f"{self.name}/{ROOT_CERT}")
        if data is None:
            if self._store.load(f"{self.name}/{ROOT_KEY}") is not None:
                raise ProviderNeedsFixError(
                    f"provider {self.name}: {ROOT_KEY} is stored without {ROOT_CERT}: restore "
                    f"{ROOT_CERT} from a backup (or, to start a new root and re-issue every "
                    f"cluster under it, remove {ROOT_KEY})"
                )
            return ()
        try:
            return (x509.load_pem_x509_certificate(data),)
        except ValueError:
            raise ProviderNeedsFixError(
                f"provider {self.name}: the stored root certificate is not valid PEM; "
                "restore it from a backup"
            ) from None

    def has_root(self) -> bool:
        return bool(self.roots())

    def create_root(self) -> x509.Certificate:
        """Create and store the root. Refuses if one exists: a root is never replaced here."""
        if self.has_root() or self._store.load(f"{self.name}/{ROOT_KEY}") is not None:
            raise ProviderNeedsFixError(f"provider {self.name}: a root already exists")
        cfg = self._config
        passphrase = self._passphrase()
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
        encrypted = key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(passphrase),
        )
        # Key first: a root certificate without its key would be unusable.
        self._store.save(f"{self.name}/{ROOT_KEY}", encrypted, secret=True)
        self._store.save(
            f"{self.name}/{ROOT_CERT}", cert.public_bytes(serialization.Encoding.PEM), secret=False
        )
        self._root = (cert, key)
        return cert

    def _load_root(self) -> tuple[x509.Certificate, CertificateIssuerPrivateKeyTypes]:
        if self._root is not None:
            return self._root
        roots = self.roots()
        if not roots:
            self.create_root()
            assert self._root is not None
            return self._root
        data = self._store.load(f"{self.name}/{ROOT_KEY}")
        if data is None:
            raise ProviderNeedsFixError(
                f"provider {self.name}: the root certificate exists but its key is missing; "
                "restore root-key.pem from a backup"
            )
        try:
            key = serialization.load_pem_private_key(data, password=self._passphrase())
        except (ValueError, TypeError):
            raise ProviderNeedsFixError(
                f"provider {self.name}: cannot decrypt the root key; check the passphrase "
                f"({self._passphrase_source()}) or restore root-key.pem from a backup"
            ) from None
        if (
            not isinstance(key, ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey)
            or key_algorithm_of(key) is None
        ):
            raise ProviderNeedsFixError(
                f"provider {self.name}: the root key is of an unsupported type"
            )
        cert = roots[0]
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

    def unlock(self) -> None:
        """Check, without writing, that signing will work: the root key decrypts
        (or, with no root yet, a passphrase is available to create one)."""
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
