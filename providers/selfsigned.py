"""A root CA that trustmgr creates on first use and keeps, encrypted, in a BlobStore.

The root key is protected one of two ways, chosen by the configuration: sealed
with a passphrase (``keyseal``, the default), or wrapped by a key management
service (``envelope``: a Vault transit key or an AWS KMS key, ``keyEncryption``).
:meth:`SelfSignedProvider.rekey` moves a stored key from one to the other.
"""

from __future__ import annotations

import importlib.util
import logging
import re
import threading
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from types import TracebackType
from typing import Protocol, Self

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.asymmetric.types import (
    CertificateIssuerPrivateKeyTypes,
    PrivateKeyTypes,
)
from cryptography.x509.oid import NameOID

from trustmgr.errors import StateError
from trustmgr.providers import envelope, keyseal
from trustmgr.providers.base import (
    BACKDATE,
    BlobStore,
    Clock,
    ProviderError,
    ProviderNeedsFixError,
    SignedCA,
    read_secret,
)
from trustmgr.providers.config import KeyEncryption, SelfSignedConfig
from trustmgr.providers.keys import KeyAlgorithm, ca_key_usage, key_algorithm_of

_COPIED_FROM_CSR = (x509.SubjectAlternativeName, x509.NameConstraints)

ROOT = "root.pem"
"""The root certificate and its encrypted key, one file written in one step."""
LEGACY_CERT, LEGACY_KEY = "root-cert.pem", "root-key.pem"
"""The two-file form of earlier releases, still read."""

_Root = tuple[x509.Certificate, CertificateIssuerPrivateKeyTypes]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Rekeyed:
    """What :meth:`SelfSignedProvider.rekey` did to a stored root key."""

    root: x509.Certificate
    before: str
    """How the key was protected, e.g. ``sealed with a passphrase (PKCS#8 ...)``."""
    after: str
    changed: bool
    """False when the key was already protected as asked and nothing was written."""


@dataclass(frozen=True)
class _Stored:
    """The stored root as one operation read it, each blob once."""

    cert: x509.Certificate
    key: bytes | None
    """The encrypted key; None when only the certificate of the two-file form is there."""
    unit: bytes | None
    """``root.pem``; None when the root is stored in the two-file form."""
    legacy_cert: bytes | None
    legacy_key: bytes | None
    """The two-file form, read when the root is stored that way or when asked for."""


def _nothing() -> None:
    """No check before a write."""


class SelfSignedProvider:
    """Signs cluster CA CSRs with a root it owns.

    The root is stored as ``<name>/root.pem``: the certificate, then the key as
    encrypted PKCS#8 or as a ``TRUSTMGR ENVELOPE``, in one file written
    atomically, so a crash can never keep one without the other. The passphrase
    comes from the environment or a file, never from the configuration; a
    wrapped key needs its KMS each time it is unlocked. ``close()`` releases
    the KMS client's connections.
    """

    def __init__(self, name: str, config: SelfSignedConfig, store: BlobStore, clock: Clock) -> None:
        self.name = name
        self._config = config
        self._store = store
        self._clock = clock
        self._root: _Root | None = None
        self._prepared: _Root | None = None
        self._resealed = False
        self._protection = _protection_of(name, config, clock)

    def close(self) -> None:
        """Release the KMS client's connections, if one was made."""
        self._protection.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def _stored(self, *, legacy: bool = False) -> _Stored | None:
        """The stored root (None if missing), each blob read once; the two-file
        form is read when ``root.pem`` is missing, or with ``legacy`` always."""
        unit = self._store.load(f"{self.name}/{ROOT}")
        legacy_cert = legacy_key = None
        if unit is None or legacy:
            legacy_cert = self._store.load(f"{self.name}/{LEGACY_CERT}")
            legacy_key = self._store.load(f"{self.name}/{LEGACY_KEY}")
        if unit is not None:
            certs, keys = _split(unit)
            if len(certs) != 1 or len(keys) != 1:
                raise ProviderNeedsFixError(
                    f"provider {self.name}: {ROOT} must hold one certificate and one encrypted "
                    "key; restore it from a backup"
                )
            cert = _load_cert(self.name, certs[0])
            return _Stored(cert, keys[0], unit, legacy_cert, legacy_key)
        if legacy_cert is None:
            if legacy_key is not None:
                raise ProviderNeedsFixError(
                    f"provider {self.name}: {LEGACY_KEY} is stored without {LEGACY_CERT}: restore "
                    f"{LEGACY_CERT} from a backup"
                )
            return None
        cert = _load_cert(self.name, legacy_cert)
        return _Stored(cert, legacy_key, None, legacy_cert, legacy_key)

    def roots(self) -> tuple[x509.Certificate, ...]:
        stored = self._stored()
        return (stored.cert,) if stored else ()

    def has_root(self) -> bool:
        return bool(self.roots())

    def prepare_root(self) -> x509.Certificate:
        if self._prepared is None:
            self._prepared = self._new_root()
        return self._prepared[0]

    def keep_prepared_root(self) -> x509.Certificate:
        if self.has_root():
            raise ProviderNeedsFixError(f"provider {self.name}: a root already exists")
        return self._keep_prepared()

    def _keep_prepared(self) -> x509.Certificate:
        """Store the prepared root, made now if it is not yet; the caller has
        checked that no root is stored."""
        self.prepare_root()
        assert self._prepared is not None
        cert, key = self._prepared
        encrypted = self._protection.seal(key, cert)
        if not isinstance(self._protection, _Passphrase):
            # a KMS that wraps but will not unwrap would leave a root no run can use
            self._check_opens(self._protection, encrypted, cert, key)
        unit = cert.public_bytes(serialization.Encoding.PEM) + encrypted
        self._store.save(f"{self.name}/{ROOT}", unit, secret=True)
        self._root, self._prepared = self._prepared, None
        return cert

    def create_root(self) -> x509.Certificate:
        """Make and store a root. Refuses if one exists."""
        if self.has_root():
            raise ProviderNeedsFixError(f"provider {self.name}: a root already exists")
        self._protection.check()  # before the key is made: a missing secret costs nothing
        return self._keep_prepared()

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
        return self._unlocked(stored)

    def _unlocked(self, stored: _Stored) -> _Root:
        """The root of ``stored`` with its key opened (once per provider), kept for signing."""
        if self._root is not None and self._root[0] == stored.cert:
            return self._root
        if stored.key is None:
            raise ProviderNeedsFixError(
                f"provider {self.name}: the root certificate exists but its key is missing; "
                f"restore {LEGACY_KEY} from a backup"
            )
        self._root = (stored.cert, self._open(self._protection, stored.cert, stored.key))
        return self._root

    def _open(
        self,
        protection: _Protection,
        cert: x509.Certificate,
        data: bytes,
        *,
        rekey_from: bool = False,
    ) -> CertificateIssuerPrivateKeyTypes:
        """The root key in ``data``, opened with ``protection`` (the configuration's,
        or with ``rekey_from`` the one a rekey was told the key is under now); a
        provider error saying what to do when it does not open or not to ``cert``."""
        if not protection.fits(data):
            stored = _form_of(data)
            if stored.startswith("sealed"):
                move = "--from-passphrase-env VAR (or --from-passphrase-file PATH)"
            else:
                move = "--from-config OLD-CONFIG"
            if rekey_from:
                raise ProviderNeedsFixError(
                    f"provider {self.name}: the root key is {stored}, not under "
                    f"{protection.what} as the --from option says: pass {move} with what "
                    "protects it now"
                )
            raise ProviderNeedsFixError(
                f"provider {self.name}: the root key is {stored}, but the configuration sets "
                f"{protection.what}: set it back, or move the key with `trustmgr state rekey "
                f"--provider {self.name} {move}`"
            )
        key = protection.unseal(data, cert)
        if (
            not isinstance(key, ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey)
            or key_algorithm_of(key) is None
        ):
            raise ProviderNeedsFixError(
                f"provider {self.name}: the root key is of an unsupported type"
            )
        if not _same_key(key, cert.public_key()):
            raise ProviderNeedsFixError(
                f"provider {self.name}: the stored root key does not match the root certificate"
            )
        return key

    def _check_opens(
        self,
        protection: _Protection,
        data: bytes,
        cert: x509.Certificate,
        key: CertificateIssuerPrivateKeyTypes,
    ) -> None:
        """Raise unless ``data`` opens with ``protection`` to ``key``."""
        if not _same_key(self._open(protection, cert, data), key.public_key()):
            raise StateError(f"{self.name}/{ROOT}: the key sealed again does not decrypt to itself")

    def reseal_if_needed(self, before_write: Callable[[], None] = _nothing) -> bool:
        """Store the root as one unit, its key sealed at the current cost, if it
        is stored in an earlier form (two files, or fewer PBKDF2 rounds), and
        remove what is left of the two-file form; the same steps as
        :meth:`rekey`. Nothing for a key wrapped by a KMS (``rekey`` wraps it
        anew) or one stored as it should be; checked once per provider.

        ``before_write`` is called before the first write and raises when none
        may be made (the daemon's leader fence); its error is raised. A failed
        write leaves the stored root as it was, still usable, and is logged: a
        later run finishes it. A key that does not open is left to signing,
        which says what to do. True when something was written."""
        if self._resealed or not isinstance(self._protection, _Passphrase):
            return False
        stored = self._stored(legacy=True)
        if stored is None or stored.key is None or not self._protection.fits(stored.key):
            return False
        try:
            _, key = self._unlocked(stored)
        except ProviderError:
            return False
        reseal = stored.unit is None or not _sealed_current(stored.key)
        leftovers = self._leftovers(self._protection, stored, key)
        if not reseal and not leftovers:
            self._resealed = True
            return False
        before_write()
        try:
            sealed = self._keep_sealed(stored, key, reseal=reseal, leftovers=leftovers)
        except (StateError, ProviderError) as exc:
            log.warning(
                "provider %s: sealing the root key again did not finish; a later run finishes it: %s",
                self.name,
                exc,
            )
            return False
        self._resealed = True
        if sealed is not None:
            log.info("provider %s: root key sealed as %s", self.name, keyseal.describe(sealed))
        return True

    def _keep_sealed(
        self,
        stored: _Stored,
        key: CertificateIssuerPrivateKeyTypes,
        *,
        reseal: bool,
        leftovers: list[str],
    ) -> bytes | None:
        """Store ``key``, opened from ``stored``, sealed anew under the
        configured protection (with ``reseal``), then remove ``leftovers``.

        The new form is opened again and compared with the key before it
        replaces the stored unit in one atomic write; the unit is then read
        back. Any failure before that leaves the stored unit as it was. The
        sealed key, if it was written."""
        cert = stored.cert
        sealed = None
        if reseal:
            sealed = self._protection.seal(key, cert)
            self._check_opens(self._protection, sealed, cert, key)
            unit_name = f"{self.name}/{ROOT}"
            unit = cert.public_bytes(serialization.Encoding.PEM) + sealed
            self._store.save(unit_name, unit, secret=True)
            if self._store.load(unit_name) != unit:
                raise StateError(f"{unit_name} does not read back as written")
        # the key first: should the run stop between the two, no copy of the key
        # in the earlier form is left, and the certificate is removed next time
        for name in leftovers:
            self._store.delete(f"{self.name}/{name}")
        self._root = (cert, key)
        return sealed

    def _leftovers(
        self, old: _Protection, stored: _Stored, key: CertificateIssuerPrivateKeyTypes
    ) -> list[str]:
        """The files of the two-file form that hold this root, key first: a
        certificate is this one, a key is the one of a certificate that is, or
        opens with ``old`` (what protected the key) to ``key``. A different
        root's files are never removed here."""
        ours = stored.legacy_cert is not None and _holds(_split(stored.legacy_cert)[0], stored.cert)
        found = []
        if stored.legacy_key is not None and (
            ours or self._opens_to(old, stored.cert, stored.legacy_key, key)
        ):
            found.append(LEGACY_KEY)
        if ours:
            found.append(LEGACY_CERT)
        return found

    def _opens_to(
        self,
        protection: _Protection,
        cert: x509.Certificate,
        data: bytes,
        key: CertificateIssuerPrivateKeyTypes,
    ) -> bool:
        if not protection.fits(data):
            return False
        try:
            return _same_key(protection.unseal(data, cert), key.public_key())
        except ProviderError:
            return False

    def unlock(self) -> None:
        stored = self._stored()
        if stored is not None:
            self._unlocked(stored)
        else:
            self._protection.check()

    def rekey(self, previous: SelfSignedConfig | None = None) -> Rekeyed:
        """Protect the stored root key as this provider's configuration says,
        opening it as ``previous`` says (its passphrase or keyEncryption; None:
        as this provider's own, which seals it afresh: a new data key under the
        KMS key's current version, or the passphrase at the current cost).

        The new form is opened again and compared with the key before it
        replaces the stored unit in one atomic write; the unit is then read back.
        A key already protected as asked (a second run) is left as it is. Any
        failure leaves the stored unit as it was."""
        stored = self._stored(legacy=True)
        if stored is None:
            raise ProviderNeedsFixError(
                f"provider {self.name} has no root yet: nothing to rekey (`trustmgr bootstrap` "
                "creates it under the configured protection)"
            )
        cert, data = stored.cert, stored.key
        if data is None:
            raise ProviderNeedsFixError(
                f"provider {self.name}: the root certificate exists but its key is missing; "
                f"restore {LEGACY_KEY} from a backup"
            )
        new = self._protection
        old = new if previous is None else _protection_of(self.name, previous, self._clock)
        try:
            try:
                key = self._open(old, cert, data, rekey_from=previous is not None)
            except ProviderNeedsFixError as failed:
                if old is new or not new.fits(data):
                    raise
                try:  # a second run, or a run stopped after the rename
                    self._open(new, cert, data)
                except ProviderNeedsFixError:
                    raise failed from None
                form = new.describe(data)
                return Rekeyed(cert, before=form, after=form, changed=False)
            leftovers = self._leftovers(old, stored, key)
        finally:
            if old is not new:
                old.close()
        sealed = self._keep_sealed(stored, key, reseal=True, leftovers=leftovers)
        assert sealed is not None
        log.info("provider %s: root key %s", self.name, new.describe(sealed))
        return Rekeyed(cert, before=old.describe(data), after=new.describe(sealed), changed=True)

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


def _split(unit: bytes) -> tuple[list[bytes], list[bytes]]:
    """The PEM certificates and encrypted keys of a stored unit."""
    certs: list[bytes] = []
    keys: list[bytes] = []
    for match in re.finditer(rb"-----BEGIN ([A-Z ]+)-----.+?-----END \1-----\r?\n?", unit, re.S):
        kind = match.group(1)
        if kind == b"CERTIFICATE":
            certs.append(match.group(0))
        elif kind in (b"ENCRYPTED PRIVATE KEY", envelope.PEM_TYPE.encode()):
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


def _same_key(key: PrivateKeyTypes, public: object) -> bool:
    spki = serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    if not isinstance(public, ec.EllipticCurvePublicKey | rsa.RSAPublicKey):
        return False
    return key.public_key().public_bytes(*spki) == public.public_bytes(*spki)


def _form_of(data: bytes) -> str:
    """How a stored key is protected, read without opening it."""
    if envelope.is_envelope(data):
        try:
            sealed = envelope.describe(data)
        except keyseal.SealFormatError:
            return "an envelope trustmgr cannot read"
        return f"wrapped by {sealed.wrapping} key {sealed.key_id}"
    try:
        return f"sealed with a passphrase ({keyseal.describe(data)})"
    except keyseal.SealFormatError:
        return "sealed with a passphrase"


class _Protection(Protocol):
    """How a root key is kept: sealed with a passphrase, or wrapped by a KMS."""

    what: str
    """The configuration that sets it, for messages: ``a passphrase``, ``keyEncryption...``."""

    def fits(self, data: bytes) -> bool:
        """Whether the stored key ``data`` is in this protection's form."""
        ...

    def check(self) -> None:
        """Raise unless the secret or client this protection needs is there."""
        ...

    def seal(self, key: PrivateKeyTypes, cert: x509.Certificate) -> bytes: ...

    def unseal(self, data: bytes, cert: x509.Certificate) -> PrivateKeyTypes:
        """The key; a provider error saying what to do if it does not open."""
        ...

    def describe(self, data: bytes) -> str: ...

    def close(self) -> None: ...


def _protection_of(name: str, config: SelfSignedConfig, clock: Clock) -> _Protection:
    if config.key_encryption is not None:
        return _Wrapped(name, config.key_encryption, clock)
    return _Passphrase(name, env=config.passphrase_env, file=config.passphrase_file)


class _Passphrase:
    what = "a passphrase"

    def __init__(self, name: str, *, env: str | None, file: str | None) -> None:
        self._name, self._env, self._file = name, env, file

    @property
    def source(self) -> str:
        if self._env:
            return f"environment variable {self._env}"
        return f"passphraseFile {self._file}"

    def secret(self) -> bytes:
        return read_secret(
            f"provider {self._name}: root key passphrase", env=self._env, file=self._file
        ).encode()

    def fits(self, data: bytes) -> bool:
        return not envelope.is_envelope(data)

    def check(self) -> None:
        self.secret()

    def seal(self, key: PrivateKeyTypes, cert: x509.Certificate) -> bytes:
        return keyseal.seal(key, self.secret())

    def unseal(self, data: bytes, cert: x509.Certificate) -> PrivateKeyTypes:
        try:
            return keyseal.unseal(data, self.secret())
        except keyseal.SealFormatError as exc:
            raise ProviderNeedsFixError(
                f"provider {self._name}: cannot read the root key: {exc}; restore {ROOT} from a "
                "backup"
            ) from None
        except keyseal.UnsealError:
            raise ProviderNeedsFixError(
                f"provider {self._name}: cannot decrypt the root key; check the passphrase "
                f"({self.source}) or restore {ROOT} from a backup"
            ) from None

    def describe(self, data: bytes) -> str:
        return _form_of(data)

    def close(self) -> None:
        pass


class _Wrapped:
    """Envelope encryption; the KMS client is built on first use."""

    def __init__(self, name: str, config: KeyEncryption, clock: Clock) -> None:
        self._name, self._config, self._clock = name, config, clock
        self._wrapper: envelope.KeyWrapper | None = None
        self._lock = threading.Lock()
        self.wrapping = "vault-transit" if config.vault_transit is not None else "aws-kms"
        kind = "vaultTransit" if config.vault_transit is not None else "awsKms"
        self.what = f"keyEncryption.{kind}"

    def _kms(self) -> envelope.KeyWrapper:
        with self._lock:
            if self._wrapper is None:
                self._wrapper = self._build()
            return self._wrapper

    def _build(self) -> envelope.KeyWrapper:
        transit, kms = self._config.vault_transit, self._config.aws_kms
        package, extra = ("hvac", "vault") if transit is not None else ("boto3", "aws")
        if importlib.util.find_spec(package) is None:
            raise ProviderNeedsFixError(
                f"provider {self._name}: {self.what} needs the {package} package: "
                f"pip install 'trustmgr[{extra}]'"
            )
        if transit is not None:
            from trustmgr.providers.transit import VaultTransitWrapper

            return VaultTransitWrapper(self._name, transit, self._clock)
        assert kms is not None
        from trustmgr.providers.awskms import AwsKmsWrapper

        return AwsKmsWrapper(self._name, kms)

    def fits(self, data: bytes) -> bool:
        if not envelope.is_envelope(data):
            return False
        try:
            return envelope.describe(data).wrapping == self.wrapping
        except keyseal.SealFormatError:
            return True  # unseal says what is damaged

    def check(self) -> None:
        self._kms()

    def seal(self, key: PrivateKeyTypes, cert: x509.Certificate) -> bytes:
        return envelope.seal(key, cert, self._kms())

    def unseal(self, data: bytes, cert: x509.Certificate) -> PrivateKeyTypes:
        try:
            return envelope.unseal(data, cert, self._kms())
        except keyseal.SealFormatError as exc:
            raise ProviderNeedsFixError(
                f"provider {self._name}: cannot read the root key: {exc}; restore {ROOT} from a "
                "backup"
            ) from None
        except keyseal.UnsealError as exc:
            raise ProviderNeedsFixError(
                f"provider {self._name}: cannot decrypt the root key: {exc}; restore {ROOT} "
                "from a backup"
            ) from None

    def describe(self, data: bytes) -> str:
        return _form_of(data)

    def close(self) -> None:
        with self._lock:
            close = getattr(self._wrapper, "close", None)
            if callable(close):
                close()


def _load_cert(provider: str, data: bytes) -> x509.Certificate:
    try:
        return x509.load_pem_x509_certificate(data)
    except ValueError:
        raise ProviderNeedsFixError(
            f"provider {provider}: the stored root certificate is not valid PEM; "
            "restore it from a backup"
        ) from None
