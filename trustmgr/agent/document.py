"""What travels between the central run and an agent, and how it is checked.

The desired document is signed with the publisher key (Ed25519) that the
central run keeps in its state store; an agent holds only the public key. The
envelope carries the document's exact bytes, so the signature covers what is
parsed and nothing has to be canonicalised again. Each document has a
sequence number: an agent refuses one older than what it applied (a replay),
and one with the sequence it applied but other content.

The report is what an agent says of itself: public certificates, the CSR it
waits on, the sequence it applied, and its last error. It is input from the
cluster, checked by whoever reads it; it never holds a private key."""

from __future__ import annotations

import base64
import hashlib
import json
import re
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from typing import Any

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from trustmgr.bundles import fingerprint
from trustmgr.errors import BadInputError, BadMaterialError, one_line

KIND_DESIRED = "trustmgr.io/desired"
KIND_REPORT = "trustmgr.io/report"
VERSION = 1
DOCUMENT_LIFETIME = timedelta(days=30)
"""How long an agent acts on a desired document; published again at half of it."""
CLOCK_SKEW = timedelta(minutes=5)
"""How far an agent's clock may run ahead of the central run's."""
MAX_DOCUMENT = 512 * 1024
"""Far above any real document (a bundle of a few roots), far below what would hurt."""
MAX_NESTING = 16
"""How deep JSON values may nest in a document (a real one goes three deep)."""
MAX_NUMBER = 2**63
"""Sequences are below it (so they fit the int64 other tools read them as)."""
MAX_SECONDS = 1000 * 366 * 86400
"""Durations are below a thousand years."""
MAX_CHAIN = 10
"""Certificates in a chain (or a CA certificate's file)."""
MAX_BUNDLE = 64
"""Certificates in a trust bundle."""
MAX_ERROR = 500
"""Characters of a report's error and foreign reason."""
MAX_PROBLEM = 300
"""Characters of each problem a report lists."""
MAX_PROBLEMS = 32
"""Problems a report lists."""
MAX_NAME = 253
"""Characters of a report's cluster name and phase."""
_KEY_ID = re.compile(r"[0-9a-f]{64}")

_PARSE_ERRORS = (ValueError, KeyError, TypeError, AttributeError, OverflowError, RecursionError)
"""What reading an untrusted document may raise: each means it is not one to act on."""


class DocumentError(BadInputError):
    """A desired document an agent must not act on: one line saying why."""


class _Unfit(ValueError):
    """A document's field is not what trustmgr writes there; the message names it,
    never its content."""


def _load(data: bytes) -> dict[str, Any]:
    """A JSON object nested at most MAX_NESTING deep."""
    try:
        value = json.loads(data)
    except RecursionError:  # json nests until the interpreter's recursion limit
        raise _Unfit(f"nested deeper than {MAX_NESTING}") from None
    todo: list[tuple[Any, int]] = [(value, 0)]
    while todo:
        item, depth = todo.pop()
        if depth > MAX_NESTING:
            raise _Unfit(f"nested deeper than {MAX_NESTING}")
        if isinstance(item, dict):
            todo.extend((child, depth + 1) for child in item.values())
        elif isinstance(item, list):
            todo.extend((child, depth + 1) for child in item)
    if not isinstance(value, dict):
        raise _Unfit("not a JSON object")
    return value


def _value(data: dict[str, Any], key: str, kind: type, what: str, *, required: bool) -> Any:
    value = data.get(key)
    if value is None:
        if required:
            raise _Unfit(f"{key} is missing")
        return None
    if not isinstance(value, kind):
        raise _Unfit(f"{key} is not {what}")
    return value


def _text(data: dict[str, Any], key: str, *, required: bool = True) -> str:
    """A string field; "" when an optional one is missing or null."""
    return str(_value(data, key, str, "a string", required=required) or "")


def _texts(data: dict[str, Any], key: str, *, required: bool = True) -> tuple[str, ...]:
    """A list of strings; () when an optional one is missing or null."""
    items = _value(data, key, list, "a list of strings", required=required) or []
    if not all(isinstance(item, str) for item in items):
        raise _Unfit(f"{key} is not a list of strings")
    return tuple(items)


def _object(data: dict[str, Any], key: str, *, required: bool = True) -> dict[str, Any]:
    """An object field; {} when an optional one is missing or null."""
    return dict(_value(data, key, dict, "an object", required=required) or {})


def _number(data: dict[str, Any], key: str, below: int = MAX_NUMBER) -> int:
    """A JSON integer from 0 to ``below`` (neither a float nor true/false)."""
    value = data.get(key)
    if type(value) is not int or not 0 <= value < below:
        raise _Unfit(f"{key} is not a whole number from 0 to {below - 1}")
    return value


def _pem(data: dict[str, Any], key: str, most: int, *, required: bool = True) -> str:
    """PEM text of at most ``most`` blocks."""
    text = _text(data, key, required=required)
    if text.count("-----BEGIN") > most:
        raise _Unfit(f"{key} holds more than {most} PEM blocks")
    return text


def _why(exc: BaseException) -> str:
    """What is wrong, for a message: a field's name, never what it holds."""
    return f" ({exc})" if isinstance(exc, _Unfit) else ""


@dataclass(frozen=True)
class Signer:
    """How the agent gets its CSR signed: ``central`` (it publishes the CSR and the
    central run signs it), or itself through the mesh's provider (``vault``,
    ``acmPca``) with its own identity. ``settings`` are the provider's
    connection settings, without credentials; ``generation`` the issuer a root
    rotation brought in ("" for the provider's own)."""

    kind: str
    provider: str
    settings: dict[str, Any] = field(default_factory=dict)
    generation: str = ""

    def to_json(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "provider": self.provider,
            "settings": self.settings,
            "generation": self.generation,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Signer:
        return cls(
            _text(data, "kind"),
            _text(data, "provider"),
            _object(data, "settings", required=False),
            _text(data, "generation", required=False),
        )


@dataclass(frozen=True)
class Signed:
    """The central run's answer to an agent's CSR."""

    csr: str
    """SHA-256 of the CSR's DER, so the agent matches it to the key it holds."""
    chain: str
    """PEM: the cluster CA first, then each issuer, without the root."""
    root: str
    """PEM: the root the chain ends under."""

    def root_fingerprint(self) -> str | None:
        """The root's SHA-256 fingerprint; None if it is not one certificate."""
        try:
            return fingerprint(x509.load_pem_x509_certificate(self.root.encode()))
        except ValueError:
            return None


@dataclass(frozen=True)
class Desired:
    """One agent cluster's desired state, as the central run publishes it."""

    cluster: str
    mesh: str
    trust_domain: str
    bundle: str
    """root-cert.pem exactly as the cluster should hold it."""
    signing_roots: tuple[str, ...]
    """SHA-256 fingerprints: the cluster CA must chain to one of them."""
    key_algorithm: str
    ttl: timedelta
    renew_before: timedelta
    signer: Signer
    organization: str | None = None
    signed: Signed | None = None
    phase: str = ""
    """The root rotation phase this document belongs to, for reports ("" none)."""
    sequence: int = 0
    not_after: datetime | None = None
    """After this an agent refuses the document: a document put back once the
    agent's own record of what it applied is lost is refused all the same."""

    def content(self) -> dict[str, Any]:
        """Everything but the sequence and the expiry: equal content needs no new
        publication."""
        return {
            "cluster": self.cluster,
            "mesh": self.mesh,
            "trustDomain": self.trust_domain,
            "bundle": self.bundle,
            "signingRoots": list(self.signing_roots),
            "keyAlgorithm": self.key_algorithm,
            "ttlSeconds": int(self.ttl.total_seconds()),
            "renewBeforeSeconds": int(self.renew_before.total_seconds()),
            "organization": self.organization,
            "signer": self.signer.to_json(),
            "signed": None
            if self.signed is None
            else {"csr": self.signed.csr, "chain": self.signed.chain, "root": self.signed.root},
            "phase": self.phase,
        }

    def same_content(self, other: Desired | None) -> bool:
        return other is not None and self.content() == other.content()

    def published(self, sequence: int, now: datetime) -> Desired:
        """The document as published at ``now`` with ``sequence``."""
        return replace(self, sequence=sequence, not_after=now + DOCUMENT_LIFETIME)

    def expiring(self, now: datetime) -> bool:
        """Half its life is gone: the central run publishes it again."""
        return self.not_after is None or now >= self.not_after - DOCUMENT_LIFETIME / 2

    def to_bytes(self) -> bytes:
        body = {
            "kind": KIND_DESIRED,
            "version": VERSION,
            "sequence": self.sequence,
            "notAfter": int(self.not_after.timestamp()) if self.not_after else None,
        }
        return json.dumps({**body, **self.content()}, sort_keys=True).encode()

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Desired:
        """The document in ``data``; raises ValueError naming the first field that
        is not what trustmgr writes there."""
        signed = None if data.get("signed") is None else _object(data, "signed")
        return cls(
            cluster=_text(data, "cluster"),
            mesh=_text(data, "mesh"),
            trust_domain=_text(data, "trustDomain"),
            bundle=_pem(data, "bundle", MAX_BUNDLE),
            signing_roots=_texts(data, "signingRoots"),
            key_algorithm=_text(data, "keyAlgorithm"),
            ttl=timedelta(seconds=_number(data, "ttlSeconds", MAX_SECONDS)),
            renew_before=timedelta(seconds=_number(data, "renewBeforeSeconds", MAX_SECONDS)),
            signer=Signer.from_json(_object(data, "signer")),
            organization=None if data.get("organization") is None else _text(data, "organization"),
            signed=None
            if signed is None
            else Signed(
                _text(signed, "csr"), _pem(signed, "chain", MAX_CHAIN), _pem(signed, "root", 1)
            ),
            phase=_text(data, "phase", required=False),
            sequence=_number(data, "sequence"),
            not_after=datetime.fromtimestamp(_number(data, "notAfter", MAX_SECONDS), UTC),
        )


def key_id(public: Ed25519PublicKey) -> str:
    """SHA-256 of the public key's raw bytes, hex: how documents name their key."""
    raw = public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()


def public_key_pem(public: Ed25519PublicKey) -> bytes:
    return public.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def load_public_keys(
    data: bytes, source: str, *, command: str = "trustmgr agent publisher-key"
) -> tuple[Ed25519PublicKey, ...]:
    """One or more Ed25519 public keys in PEM, one after another."""
    blocks = [
        block
        for block in data.split(b"-----END PUBLIC KEY-----")
        if b"-----BEGIN PUBLIC KEY-----" in block
    ]
    if not blocks:
        raise BadMaterialError(f"{source}: not a PEM public key; use what `{command}` prints")
    return tuple(
        load_public_key(block + b"-----END PUBLIC KEY-----\n", source, command=command)
        for block in blocks
    )


def load_public_key(
    data: bytes, source: str, *, command: str = "trustmgr agent publisher-key"
) -> Ed25519PublicKey:
    """An Ed25519 public key in PEM, as ``command`` prints it."""
    try:
        key = serialization.load_pem_public_key(data)
    except (ValueError, TypeError):
        raise BadMaterialError(
            f"{source}: not a PEM public key; use what `{command}` prints"
        ) from None
    if not isinstance(key, Ed25519PublicKey):
        raise BadMaterialError(f"{source}: not an Ed25519 key; use what `{command}` prints")
    return key


@dataclass(frozen=True)
class _Envelope:
    """A signed payload as it travels: the payload's exact bytes, their Ed25519
    signature, the signer's key id, and for a report the signer's public key."""

    payload: bytes
    signature: bytes
    key: str
    public_key: str = ""

    @classmethod
    def sign(cls, payload: bytes, key: Ed25519PrivateKey, *, with_public_key: bool) -> bytes:
        public = key.public_key()
        envelope = {
            "payload": base64.b64encode(payload).decode(),
            "key": key_id(public),
            "signature": base64.b64encode(key.sign(payload)).decode(),
        }
        if with_public_key:
            envelope["publicKey"] = public_key_pem(public).decode()
        return json.dumps(envelope, sort_keys=True).encode()

    @classmethod
    def read(cls, data: bytes) -> _Envelope:
        """Raises one of _PARSE_ERRORS naming what is wrong."""
        envelope = _load(data)
        signed_by = _text(envelope, "key")
        if not _KEY_ID.fullmatch(signed_by):
            raise _Unfit("key is not a SHA-256 in hex")
        return cls(
            base64.b64decode(_text(envelope, "payload"), validate=True),
            base64.b64decode(_text(envelope, "signature"), validate=True),
            signed_by,
            _text(envelope, "publicKey", required=False),
        )


def seal(desired: Desired, key: Ed25519PrivateKey) -> bytes:
    """The envelope published for the agent."""
    return _Envelope.sign(desired.to_bytes(), key, with_public_key=False)


def digest(envelope: bytes) -> str:
    return hashlib.sha256(envelope).hexdigest()


def unseal(
    data: bytes,
    key: Ed25519PublicKey | tuple[Ed25519PublicKey, ...] | None,
    *,
    where: str,
) -> Desired:
    """The document in ``data``, its signature checked with ``key``, or with the one
    of several keys it names (an agent trusting an old and a new publisher key
    while the publisher key is replaced); None: read without checking, which only
    the central run does with its own publication. Raises DocumentError with one line."""
    if len(data) > MAX_DOCUMENT:
        raise DocumentError(f"{where}: the desired document is over {MAX_DOCUMENT} bytes")
    try:
        envelope = _Envelope.read(data)
        payload, signature, signed_by = envelope.payload, envelope.signature, envelope.key
    except _PARSE_ERRORS as exc:
        raise DocumentError(
            f"{where}: not a signed trustmgr desired document{_why(exc)}; the central run "
            "publishes it again at its next pass"
        ) from None
    if key is not None:
        trusted = {key_id(k): k for k in (key if isinstance(key, tuple) else (key,))}
        if signed_by not in trusted:
            names = ", ".join(f"{k[:16]}…" for k in trusted)
            raise DocumentError(
                f"{where}: the desired document is signed by publisher key {signed_by[:16]}…, "
                f"this agent trusts {names}: refusing it; give the agent the key "
                "`trustmgr agent publisher-key` prints"
            )
        key = trusted[signed_by]
        try:
            key.verify(signature, payload)
        except InvalidSignature:
            raise DocumentError(
                f"{where}: the desired document's signature does not verify: refusing a "
                "tampered document; nothing was changed"
            ) from None
    try:
        data_ = _load(payload)
        if data_.get("kind") != KIND_DESIRED or data_.get("version") != VERSION:
            raise ValueError("kind")
        return Desired.from_json(data_)
    except _PARSE_ERRORS as exc:
        raise DocumentError(
            f"{where}: the desired document is signed but not one this trustmgr reads"
            f"{_why(exc)} (kind {KIND_DESIRED}, version {VERSION}); use the same trustmgr "
            "version centrally and in the cluster"
        ) from None


def check_expiry(desired: Desired, now: datetime, *, where: str) -> None:
    """Refuse a document past its notAfter (a replay the sequence cannot tell)."""
    if desired.not_after is not None and now > desired.not_after + CLOCK_SKEW:
        raise DocumentError(
            f"{where}: the desired document expired at {desired.not_after:%Y-%m-%dT%H:%M}Z: "
            "refusing an old document; the central run publishes a new one at its next pass"
        )


def check_sequence(
    desired: Desired, envelope_digest: str, applied: int, applied_digest: str, *, where: str
) -> None:
    """Refuse a replayed document: older than the one applied, or another with its number."""
    if desired.sequence < applied:
        raise DocumentError(
            f"{where}: the desired document has sequence {desired.sequence}, older than the applied "
            f"{applied}: refusing a replayed document; nothing was changed"
        )
    if desired.sequence == applied and applied_digest and envelope_digest != applied_digest:
        raise DocumentError(
            f"{where}: the desired document has sequence {desired.sequence}, already applied with other "
            "content: refusing a replayed or forged document; nothing was changed"
        )


@dataclass(frozen=True)
class Report:
    """What an agent reports of its cluster: public material only."""

    cluster: str
    sequence: int = 0
    """The desired document's sequence it applied (0: none yet)."""
    ca_cert: str = ""
    cert_chain: str = ""
    root_cert: str = ""
    problems: tuple[str, ...] = ()
    """What the agent found wrong with its cacerts (it alone can check the key)."""
    csr: str = ""
    """PEM CSR waiting for the central run to sign it ("" none)."""
    phase: str = ""
    error: str = ""
    """The agent's last error, one line ("" none)."""
    foreign: str = ""
    """Why the cacerts it holds are not trustmgr's ("" they are, or there is none)."""
    reported_at: datetime | None = None

    def __post_init__(self) -> None:
        # What a report says in words is bounded where any report is made, built by
        # the agent or parsed by anyone: one line of printable characters each (no
        # fake lines in what the central run prints), and short. Building and
        # parsing then give equal reports for equal facts.
        bounded = {
            "cluster": one_line(self.cluster, MAX_NAME),
            "phase": one_line(self.phase, MAX_NAME),
            "error": one_line(self.error, MAX_ERROR),
            "foreign": one_line(self.foreign, MAX_ERROR),
            "problems": tuple(one_line(p, MAX_PROBLEM) for p in self.problems[:MAX_PROBLEMS]),
        }
        for name, value in bounded.items():
            object.__setattr__(self, name, value)

    def to_bytes(self) -> bytes:
        return json.dumps(
            {
                "kind": KIND_REPORT,
                "version": VERSION,
                "cluster": self.cluster,
                "sequence": self.sequence,
                "caCert": self.ca_cert,
                "certChain": self.cert_chain,
                "rootCert": self.root_cert,
                "problems": list(self.problems),
                "csr": self.csr,
                "phase": self.phase,
                "error": self.error,
                "foreign": self.foreign,
                "reportedAt": self.reported_at.isoformat() if self.reported_at else None,
            },
            sort_keys=True,
        ).encode()

    @classmethod
    def parse(cls, data: bytes, *, where: str) -> Report:
        if len(data) > MAX_DOCUMENT:
            raise BadMaterialError(f"{where}: the agent's report is over {MAX_DOCUMENT} bytes")
        try:
            d = _load(data)
            if d.get("kind") != KIND_REPORT or d.get("version") != VERSION:
                raise ValueError("kind")
            at = _text(d, "reportedAt", required=False)
            reported_at = datetime.fromisoformat(at) if at else None
            if reported_at is not None and reported_at.utcoffset() is None:
                raise _Unfit("reportedAt has no time zone")
            report = cls(
                cluster=_text(d, "cluster"),
                sequence=_number(d, "sequence"),
                ca_cert=_pem(d, "caCert", MAX_CHAIN, required=False),
                cert_chain=_pem(d, "certChain", MAX_CHAIN, required=False),
                root_cert=_pem(d, "rootCert", MAX_BUNDLE, required=False),
                problems=_texts(d, "problems", required=False),
                csr=_pem(d, "csr", 1, required=False),
                phase=_text(d, "phase", required=False),
                error=_text(d, "error", required=False),
                foreign=_text(d, "foreign", required=False),
                reported_at=reported_at,
            )
        except _PARSE_ERRORS as exc:
            raise BadMaterialError(
                f"{where}: not a trustmgr agent report{_why(exc)}; the agent writes it again at "
                "its next pass"
            ) from None
        if "PRIVATE KEY" in data.decode(errors="replace"):
            raise BadMaterialError(
                f"{where}: the agent's report holds a private key; refusing to read it"
            )
        return report

    def csr_request(self) -> x509.CertificateSigningRequest | None:
        if not self.csr:
            return None
        try:
            return x509.load_pem_x509_csr(self.csr.encode())
        except ValueError:
            raise BadMaterialError(
                f"cluster {self.cluster}: the agent's CSR is not a PEM CSR"
            ) from None


def csr_digest(csr: x509.CertificateSigningRequest) -> str:
    return hashlib.sha256(csr.public_bytes(serialization.Encoding.DER)).hexdigest()


def seal_report(report: Report, key: Ed25519PrivateKey) -> bytes:
    """The report as the agent writes it, signed with its identity key: the
    central run trusts it only from the key it knows for the cluster."""
    return _Envelope.sign(report.to_bytes(), key, with_public_key=True)


def open_report(data: bytes, *, where: str) -> tuple[Report, str]:
    """The report in ``data`` and the key id of the identity that signed it;
    BadMaterialError with one line for anything else."""
    if len(data) > MAX_DOCUMENT:
        raise BadMaterialError(f"{where}: the agent's report is over {MAX_DOCUMENT} bytes")
    try:
        envelope = _Envelope.read(data)
        try:
            identity = load_public_key(envelope.public_key.encode(), where)
        except BadMaterialError:
            raise _Unfit("publicKey is not an Ed25519 public key") from None
        if key_id(identity) != envelope.key:
            raise _Unfit("key is not the id of publicKey")
        identity.verify(envelope.signature, envelope.payload)
    except InvalidSignature:
        raise BadMaterialError(
            f"{where}: the agent's report is not signed by the key it names; refusing it"
        ) from None
    except _PARSE_ERRORS as exc:
        raise BadMaterialError(
            f"{where}: not a trustmgr agent report{_why(exc)}; the agent writes it again at "
            "its next pass"
        ) from None
    return Report.parse(envelope.payload, where=where), envelope.key
