"""``trustmgr state rekey``: a self-signed provider's stored root keys moved to
the protection its configuration sets now (a new passphrase, or keyEncryption),
opened with the one they are under (``--from-...``, or the configuration's own)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from pydantic import ValidationError

from trustmgr import config as config_mod
from trustmgr.bundles import fingerprint
from trustmgr.errors import BadInputError
from trustmgr.providers import Clock
from trustmgr.providers.config import SelfSignedConfig
from trustmgr.providers.selfsigned import Rekeyed, SelfSignedProvider
from trustmgr.state.build import build_store
from trustmgr.state.store import StateStore
from trustmgr.workspace import authority


@dataclass(frozen=True)
class RootRekeyed:
    """One stored root of the provider and what rekey did to its key."""

    generation: str
    """Where the root is kept: "" for the first, or a rotation's generation."""
    fingerprint: str
    result: Rekeyed


def previous_protection(
    config: config_mod.Config,
    provider: str,
    *,
    passphrase_env: str | None = None,
    passphrase_file: Path | None = None,
    config_path: Path | None = None,
) -> SelfSignedConfig | None:
    """What protects the stored key now, from the ``--from-...`` options: a
    passphrase variable or file, or the selfSigned settings of ``provider`` in
    another configuration file. None when no option is given: the key is
    under the configuration's own protection and is sealed afresh."""
    given = [o for o in (passphrase_env, passphrase_file, config_path) if o is not None]
    if len(given) > 1:
        raise BadInputError(
            "give at most one of --from-passphrase-env, --from-passphrase-file and --from-config"
        )
    if passphrase_env is not None:
        try:
            return SelfSignedConfig(passphrase_env=passphrase_env)
        except ValidationError:
            raise BadInputError(
                "--from-passphrase-env takes the name of an environment variable (letters, "
                "digits and _), not the passphrase"
            ) from None
    if passphrase_file is not None:
        return SelfSignedConfig(passphrase_file=str(passphrase_file))
    if config_path is not None:
        entry = config_mod.load(config_path).providers.get(provider)
        if entry is None or entry.self_signed is None:
            raise BadInputError(f"{config_path}: it has no selfSigned provider {provider}")
        return entry.self_signed
    return None


def rekey(
    config: config_mod.Config,
    provider: str,
    *,
    previous: SelfSignedConfig | None,
    clock: Clock,
    store: StateStore | None = None,
) -> list[RootRekeyed]:
    """Rekey every root of ``provider`` the state names (the current one, and
    the new root of a rotation in progress), holding the state lock. Each key is
    opened again in its new form before it replaces the stored one; a root
    whose key is already protected as configured is left as it is, so a
    stopped rekey is finished by running it again."""
    entry = config.providers.get(provider)
    if entry is None:
        known = ", ".join(sorted(config.providers)) or "none"
        raise BadInputError(f"unknown provider {provider!r} (providers: {known})")
    if entry.self_signed is None:
        raise BadInputError(
            f"provider {provider} is of kind {entry.kind}: only a selfSigned provider keeps a "
            "root key for trustmgr to rekey"
        )
    if store is None:
        built = build_store(config.state_store)
        try:
            return rekey(config, provider, previous=previous, clock=clock, store=built)
        finally:
            built.close()
    done = []
    with store.lock():
        state = store.load()
        generations = [state.generations.get(provider, "")]
        rotation = state.rotations.get(provider)
        if rotation is not None and rotation.generation not in generations:
            generations.append(rotation.generation)
        for generation in generations:
            keeper = authority(config, store, provider, generation, clock)
            assert isinstance(keeper, SelfSignedProvider)
            try:
                result = keeper.rekey(previous)
            finally:
                keeper.close()
            done.append(RootRekeyed(generation, fingerprint(result.root), result))
    return done
