"""A Vault or OpenBao transit key that wraps the self-signed root key's data key.

A data key is made locally (32 bytes from the OS) and wrapped by
``<mount>/encrypt/<key>``; it is unwrapped by ``<mount>/decrypt/<key>``. Both
carry the envelope's context as ``associated_data``, so the transit key
(``aes256-gcm96``, the default type, or another AEAD type) opens a wrapped data
key for its own root only. The token's policy needs ``update`` on both paths;
trustmgr never creates, rotates or configures the transit key.

Login, renewal and logging in again are the Vault provider's
(``VaultSession``). Nothing is retried here: a sealed, unreachable or
throttled Vault is a ProviderTransientError and the next run tries again.
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
import os
from collections.abc import Mapping

from trustmgr.providers.base import (
    Clock,
    ProviderError,
    ProviderNeedsFixError,
    ProviderTransientError,
)
from trustmgr.providers.config import VaultTransitKeyEncryption
from trustmgr.providers.envelope import DataKey
from trustmgr.providers.vault import VaultFailure, VaultSession, connection_error

log = logging.getLogger(__name__)

_DENIED = frozenset({401, 403})


class VaultTransitWrapper:
    """Wraps data keys with the transit key of ``config``."""

    wrapping = "vault-transit"

    def __init__(self, name: str, config: VaultTransitKeyEncryption, clock: Clock) -> None:
        self.name = name
        self._config = config
        self._session = VaultSession(name, config, clock)
        if config.tls_skip_verify:
            log.warning(
                "provider %s: TLS verification of %s is disabled (keyEncryption.vaultTransit."
                "tlsSkipVerify); anyone on the network path can read the Vault token and the "
                "root key's data key",
                name,
                config.address,
            )

    @property
    def key_id(self) -> str:
        """The transit key as stored in an envelope: ``<mount>/<key>``."""
        return f"{self._config.mount}/{self._config.key}"

    def data_key(self, context: Mapping[str, str]) -> DataKey:
        plaintext = os.urandom(32)
        path = f"{self._config.mount}/encrypt/{self._config.key}"
        body = {"plaintext": _b64(plaintext), "associated_data": _associated(context)}
        data = self._data(path, body)
        wrapped = data.get("ciphertext")
        if not isinstance(wrapped, str) or not wrapped.startswith("vault:v"):
            raise self._unexpected(path, "no ciphertext")
        return DataKey(key_id=self.key_id, wrapped=wrapped, plaintext=plaintext)

    def unwrap(self, key_id: str, wrapped: str, context: Mapping[str, str]) -> bytes:
        if key_id != self.key_id:
            raise ProviderNeedsFixError(
                f"provider {self.name}: the root key's data key is wrapped by transit key "
                f"{key_id}, the configuration names {self.key_id}: set keyEncryption."
                "vaultTransit's mount and key as they were, or move the key with `trustmgr "
                f"state rekey --provider {self.name} --from-config OLD-CONFIG`"
            )
        path = f"{self._config.mount}/decrypt/{self._config.key}"
        data = self._data(path, {"ciphertext": wrapped, "associated_data": _associated(context)})
        plaintext = data.get("plaintext")
        if not isinstance(plaintext, str):
            raise self._unexpected(path, "no plaintext")
        try:
            return base64.b64decode(plaintext, validate=True)
        except binascii.Error:
            raise self._unexpected(path, "no plaintext") from None

    def close(self) -> None:
        self._session.close()

    def _data(self, path: str, body: Mapping[str, object]) -> Mapping[str, object]:
        try:
            answer = self._session.call("post", path, body)
        except VaultFailure as failure:
            raise self._translate(failure) from None
        data = answer.get("data")
        if not isinstance(data, dict):
            raise self._unexpected(path, "no data")
        return data

    def _unexpected(self, path: str, detail: str) -> ProviderNeedsFixError:
        return ProviderNeedsFixError(
            f"provider {self.name}: keyEncryption: unexpected answer from Vault on {path} "
            f"({detail}); is {self._config.mount} a transit mount?"
        )

    def _translate(self, failure: VaultFailure) -> ProviderError:
        """The one place a failed transit call becomes a provider error."""
        cfg = self._config
        who = f"provider {self.name}: keyEncryption"
        where = failure.path + (f" (namespace {cfg.namespace})" if cfg.namespace else "")
        status, text = failure.status, failure.text
        reached = connection_error(
            who,
            cfg,
            failure,
            where,
            why_it_matters="the root key cannot be unwrapped without it: ",
        )
        if reached is not None:
            return reached
        if failure.reason == "answer":
            return self._unexpected(where, failure.detail)
        if status == 503:
            state = "sealed" if "sealed" in text.lower() else "unavailable (HTTP 503)"
            return ProviderTransientError(f"{who}: Vault at {cfg.address} is {state}")
        if failure.path.startswith("auth/"):
            if status is not None and status >= 500:
                return ProviderTransientError(f"{who}: Vault failed on {where} (HTTP {status})")
            return self._session.login_error(failure, where)
        if status == 429 or status == 412 or (status is not None and status >= 500):
            return ProviderTransientError(
                f"{who}: Vault failed on {where} (HTTP {status}); try again later"
            )
        if status in _DENIED:
            exists = (
                ", and the transit key must exist (trustmgr does not create it)"
                if "/encrypt/" in failure.path
                else ""
            )
            return ProviderNeedsFixError(
                f'{who}: permission denied on {where}: the token\'s policy needs "update" on '
                f"that path{exists}"
            )
        if status == 404 and "no handler for route" in text:
            return ProviderNeedsFixError(
                f"{who}: nothing is mounted at {cfg.mount}/ (request to {where}): set "
                "keyEncryption.vaultTransit.mount to the path of a transit secrets engine"
            )
        if "key not found" in text:
            return ProviderNeedsFixError(
                f"{who}: transit key {cfg.key} does not exist in mount {cfg.mount}: check "
                "keyEncryption.vaultTransit.key; a deleted transit key cannot unwrap the root "
                "key again (restore Vault from a backup)"
            )
        if "disallowed by policy" in text:
            return ProviderNeedsFixError(
                f"{who}: transit key {self.key_id} refuses the key version that wrapped the root "
                "key's data key (its min_decryption_version was raised): lower it, run `trustmgr "
                f"state rekey --provider {self.name}` to wrap it with the current version, then "
                "raise it again"
            )
        if status == 400 and any(
            marker in text for marker in ("invalid ciphertext", "message authentication failed")
        ):
            return ProviderNeedsFixError(
                f"{who}: Vault cannot unwrap the root key's data key with transit key "
                f"{self.key_id} ({self._session.scrub(text)}): it was altered, or it belongs to "
                "another root or transit key; restore root.pem from a backup"
            )
        said = f": {self._session.scrub(text)}" if text else ""
        return ProviderNeedsFixError(f"{who}: Vault refused {where} (HTTP {status}){said}")


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _associated(context: Mapping[str, str]) -> str:
    return _b64(json.dumps(dict(context), sort_keys=True, separators=(",", ":")).encode())
