"""The vault state store against a real OpenBao's KV version 2: saves refused by
Vault's ``cas``, the run lock as a CAS'd record with an expiry, and whole runs of
trustmgr keeping their state there under the policy the docs give."""

from __future__ import annotations

import base64
import json
import re
import time
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import hvac.exceptions
import pytest
import yaml

from tests.conftest import REPO, snapshot, trustmgr
from tests.openbao import OpenBaoServer, create_token, root_client
from trustmgr.config import VaultStateStoreConfig
from trustmgr.errors import LockedError, StateError
from trustmgr.state.model import State
from trustmgr.state.vault import VaultStateStore

Stores = Callable[..., VaultStateStore]
APPROLE_MOUNT = "approle-state"


@pytest.fixture
def path() -> str:
    """A KV path of this test's own."""
    return f"tests/{uuid.uuid4().hex[:12]}"


@pytest.fixture
def root_token_file(openbao: OpenBaoServer, tmp_path: Path) -> Path:
    token = tmp_path / "root-token"
    token.write_text(openbao.root_token)
    return token


@pytest.fixture
def stores(openbao: OpenBaoServer, path: str, root_token_file: Path) -> Iterator[Stores]:
    """Stores at ``path``, as separate runs would build them; closed after."""
    made: list[VaultStateStore] = []

    def make(lock_duration: timedelta = timedelta(seconds=60), **config: Any) -> VaultStateStore:
        settings = {
            "address": openbao.address,
            "path": path,
            "auth": {"token": {"file": str(root_token_file)}},
            **config,
        }
        store = VaultStateStore(
            VaultStateStoreConfig.model_validate(settings), lock_duration=lock_duration
        )
        made.append(store)
        return store

    yield make
    for store in made:
        store.close()


def kv(server: OpenBaoServer, path: str) -> dict[str, Any] | None:
    """The data at ``secret/<path>``, read with the root token; None when absent."""
    with root_client(server) as client:
        try:
            answer = client.secrets.kv.v2.read_secret_version(
                path, mount_point="secret", raise_on_deleted_version=True
            )
        except hvac.exceptions.InvalidPath:
            return None
    return dict(answer["data"]["data"])


def take(store: VaultStateStore) -> None:
    with store.lock():
        pass


def with_generation(state: State, generation: str) -> State:
    return State(version=state.version, generations={"corp": generation})


# --- the state and blobs ---------------------------------------------------------------------


def test_state_and_blobs_are_kv_secrets(stores: Stores, openbao: OpenBaoServer, path: str) -> None:
    store = stores()
    assert store.load() == State()
    assert store.blobs().names() == []
    saved = store.save(with_generation(store.load(), "20300101"))
    store.blobs().save("corp/root.pem", b"sealed root", secret=True)
    store.blobs().save("corp/generation-2/root.pem", b"later root", secret=True)

    state = kv(openbao, path)
    assert state is not None and state["version"] == 1
    assert state["generations"] == {"corp": "20300101"}
    assert kv(openbao, f"{path}/blobs/corp/root.pem") == {"blob": "c2VhbGVkIHJvb3Q="}

    again = stores()
    assert again.load() == saved
    assert again.blobs().names() == ["corp/generation-2/root.pem", "corp/root.pem"]
    assert again.blobs().load("corp/generation-2/root.pem") == b"later root"
    again.blobs().delete("corp/root.pem")
    again.blobs().delete("corp/root.pem")  # absent: nothing happens
    assert store.blobs().load("corp/root.pem") is None
    with root_client(openbao) as client:  # every version destroyed, not only the latest
        listed = client.secrets.kv.v2.list_secrets(f"{path}/blobs/corp", mount_point="secret")
    assert listed["data"]["keys"] == ["generation-2/"]


def test_a_save_over_a_newer_state_is_refused(
    stores: Stores, openbao: OpenBaoServer, path: str
) -> None:
    first, second = stores(), stores()
    seen_first, seen_second = first.load(), second.load()
    first.save(with_generation(seen_first, "one"))
    with pytest.raises(StateError, match=r"changed during this run \(version 0 → 1\); run again"):
        second.save(with_generation(seen_second, "two"))
    assert (kv(openbao, path) or {})["generations"] == {"corp": "one"}


def test_vault_refuses_a_write_carrying_a_stale_cas(
    stores: Stores, openbao: OpenBaoServer, path: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The other writer saves after this one read: the write carries the version
    read, Vault refuses it (check-and-set), the state is read again and the save
    refused because its version moved."""
    mine, other = stores(), stores()
    mine.save(State())
    seen = mine.load()
    real_read = mine.read
    calls: list[int] = []

    def read_then_other_saves(at: str) -> Any:
        found = real_read(at)
        if at == path and not calls:
            calls.append(1)
            other.save(with_generation(other.load(), "theirs"))
        return found

    monkeypatch.setattr(mine, "read", read_then_other_saves)
    written: list[int | None] = []
    real_write = mine.write

    def recording_write(at: str, data: dict[str, Any], *, cas: int | None) -> int:
        written.append(cas)
        return real_write(at, data, cas=cas)

    monkeypatch.setattr(mine, "write", recording_write)
    with pytest.raises(StateError, match=r"changed during this run \(version 1 → 2\)"):
        mine.save(with_generation(seen, "mine"))
    assert written == [1]  # refused by Vault: the state was at KV version 2 by then
    assert (kv(openbao, path) or {})["generations"] == {"corp": "theirs"}


# --- the lock --------------------------------------------------------------------------------


def test_a_held_lock_fails_a_second_holder_at_once(
    stores: Stores, openbao: OpenBaoServer, path: str
) -> None:
    first, second = stores(), stores()
    with first.lock():
        record = kv(openbao, f"{path}/lock") or {}
        assert record["holder"] and record["expires"] > datetime.now(UTC).isoformat()
        started = time.monotonic()
        with pytest.raises(LockedError, match=r"another trustmgr run \(.*\) holds the state lock"):
            take(second)
        assert time.monotonic() - started < 1
    assert (kv(openbao, f"{path}/lock") or {})["holder"] == ""
    take(second)


def test_an_expired_lock_is_taken_over(stores: Stores, openbao: OpenBaoServer, path: str) -> None:
    long_ago = datetime.now(UTC) - timedelta(minutes=5)
    with root_client(openbao) as client:
        client.secrets.kv.v2.create_or_update_secret(
            f"{path}/lock",
            secret={
                "holder": "dead-host/pid-1/0000",
                "expires": (long_ago + timedelta(seconds=60)).isoformat(),
                "renewed": long_ago.isoformat(),
            },
            mount_point="secret",
        )
    store = stores()
    with store.lock():
        assert (kv(openbao, f"{path}/lock") or {})["holder"] != "dead-host/pid-1/0000"
        store.save(State())


def test_a_long_run_keeps_its_lock_renewed(
    stores: Stores, openbao: OpenBaoServer, path: str
) -> None:
    holder, other = stores(lock_duration=timedelta(seconds=1.5)), stores()
    with holder.lock():
        first = (kv(openbao, f"{path}/lock") or {})["renewed"]
        time.sleep(3.5)  # more than twice the duration
        assert (kv(openbao, f"{path}/lock") or {})["renewed"] > first
        with pytest.raises(LockedError):
            take(other)
        holder.save(State())


def test_a_run_that_lost_its_lock_writes_nothing_more(
    stores: Stores, openbao: OpenBaoServer, path: str
) -> None:
    store = stores(lock_duration=timedelta(seconds=3))
    with store.lock():
        with root_client(openbao) as client:
            client.secrets.kv.v2.create_or_update_secret(
                f"{path}/lock",
                secret={"holder": "intruder", "expires": "9999-01-01T00:00:00+00:00"},
                mount_point="secret",
            )
        time.sleep(2)  # a renewal (every second) finds the record taken
        with pytest.raises(LockedError, match=r"this run lost the state lock .*intruder holds it"):
            store.save(State())
        with pytest.raises(LockedError, match="lost the state lock"):
            store.blobs().save("corp/root.pem", b"x", secret=True)
    assert kv(openbao, path) is None
    assert (kv(openbao, f"{path}/lock") or {})["holder"] == "intruder"


def test_a_mount_that_requires_cas_takes_every_write(
    stores: Stores, openbao: OpenBaoServer
) -> None:
    with root_client(openbao) as client:
        if "kvcas/" not in client.sys.list_mounted_secrets_engines()["data"]:
            client.sys.enable_secrets_engine("kv", path="kvcas", options={"version": "2"})
            client.secrets.kv.v2.configure(cas_required=True, mount_point="kvcas")
    store = stores(mount="kvcas")
    with store.lock():
        store.save(store.load())
        store.blobs().save("corp/root.pem", b"one", secret=True)
        store.blobs().save("corp/root.pem", b"two", secret=True)
    assert stores(mount="kvcas").blobs().load("corp/root.pem") == b"two"


# --- refusals --------------------------------------------------------------------------------


def test_a_kv_version_1_mount_is_refused(stores: Stores, openbao: OpenBaoServer) -> None:
    with root_client(openbao) as client:
        if "kv1/" not in client.sys.list_mounted_secrets_engines()["data"]:
            client.sys.enable_secrets_engine("kv", path="kv1", options={"version": "1"})
    with pytest.raises(StateError, match=r"kv1 .* is not a KV version 2 secrets engine"):
        stores(mount="kv1").load()


def test_missing_credentials_are_named_without_their_value(
    stores: Stores, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("VAULT_TOKEN", raising=False)
    with pytest.raises(StateError) as refused:
        stores(auth={"token": {}}).load()
    assert str(refused.value) == (
        "stateStore.vault: auth.token: environment variable VAULT_TOKEN is empty or unset"
    )


def test_a_token_without_the_policy_is_found_before_any_write(
    stores: Stores, openbao: OpenBaoServer, tmp_path: Path
) -> None:
    token = tmp_path / "weak-token"
    token.write_text(create_token(openbao, "default"))
    store = stores(auth={"token": {"file": str(token)}})
    with pytest.raises(StateError, match=r"may not write secret/data/tests/.*: its policy needs"):
        store.check_writable()
    with pytest.raises(StateError, match=r"permission denied on secret/data/tests/.*\"read\""):
        store.load()


# --- whole runs, with the docs' policy ----------------------------------------------------------


def docs_policy() -> str:
    text = (REPO / "docs" / "state.md").read_text()
    found = re.search(r"```hcl\n(.*?)```", text, re.DOTALL)
    assert found is not None
    return found.group(1)


@pytest.fixture
def approle(openbao: OpenBaoServer, tmp_path: Path) -> dict[str, str]:
    """An AppRole holding exactly the policy docs/state.md gives; its path is
    the default, trustmgr/state, emptied first."""
    with root_client(openbao) as client:
        client.sys.create_or_update_policy("trustmgr-state", docs_policy())
        # Its own mount: the session's PKI fixture enables the one at approle/.
        if f"{APPROLE_MOUNT}/" not in client.sys.list_auth_methods()["data"]:
            client.sys.enable_auth_method("approle", path=APPROLE_MOUNT)
        approle = client.auth.approle
        approle.create_or_update_approle(
            "trustmgr-state",
            token_policies=["trustmgr-state"],
            token_ttl="1h",
            mount_point=APPROLE_MOUNT,
        )
        role_id = approle.read_role_id("trustmgr-state", mount_point=APPROLE_MOUNT)["data"]
        secret = approle.generate_secret_id("trustmgr-state", mount_point=APPROLE_MOUNT)["data"]
        for stale in ("trustmgr/state", "trustmgr/state/lock"):
            client.secrets.kv.v2.delete_metadata_and_all_versions(stale, mount_point="secret")
        try:
            blobs = client.secrets.kv.v2.list_secrets(
                "trustmgr/state/blobs/corp", mount_point="secret"
            )
        except hvac.exceptions.InvalidPath:
            blobs = {"data": {"keys": []}}
        for key in blobs["data"]["keys"]:
            client.secrets.kv.v2.delete_metadata_and_all_versions(
                f"trustmgr/state/blobs/corp/{key}", mount_point="secret"
            )
    (tmp_path / "role-id").write_text(role_id["role_id"])
    (tmp_path / "secret-id").write_text(secret["secret_id"])
    return {
        "mount": APPROLE_MOUNT,
        "roleIdFile": str(tmp_path / "role-id"),
        "secretIdFile": str(tmp_path / "secret-id"),
    }


def write_config(workdir: Path, store: dict[str, Any]) -> Path:
    config = {
        "stateStore": {"vault": store},
        "providers": {"corp": {"selfSigned": {"passphraseEnv": "TRUSTMGR_PASSPHRASE"}}},
        "meshes": {
            "web": {
                "trustDomain": "web.example",
                "provider": "corp",
                "clusters": {
                    "web-1": {"directory": {"path": "out/web-1"}},
                    "web-2": {"directory": {"path": "out/web-2"}},
                },
            }
        },
    }
    path = workdir / "trustmgr.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def test_bootstrap_and_a_rerun_keep_the_state_in_vault(
    workdir: Path, openbao: OpenBaoServer, approle: dict[str, str]
) -> None:
    config = write_config(workdir, {"address": openbao.address, "auth": {"appRole": approle}})
    holder = VaultStateStore(
        VaultStateStoreConfig.model_validate(
            {"address": openbao.address, "auth": {"appRole": approle}}
        )
    )
    try:
        with holder.lock():
            refused = trustmgr("-c", str(config), "bootstrap")
    finally:
        holder.close()
    assert refused.code == 1
    assert "holds the state lock (secret/trustmgr/state/lock)" in refused.err

    first = trustmgr("-c", str(config), "bootstrap")
    assert first.code == 0, first.err
    assert not (workdir / ".trustmgr").exists()
    state = kv(openbao, "trustmgr/state") or {}
    assert sorted(state["clusters"]) == ["web-1", "web-2"]
    blob = kv(openbao, "trustmgr/state/blobs/corp/root.pem") or {}
    root = base64.b64decode(blob["blob"])
    assert b"BEGIN ENCRYPTED PRIVATE KEY" in root and b"BEGIN PRIVATE KEY" not in root

    before = snapshot(workdir / "out")
    again = trustmgr("-c", str(config), "bootstrap")
    assert again.code == 0, again.err
    assert snapshot(workdir / "out") == before
    assert (kv(openbao, "trustmgr/state") or {})["version"] == state["version"]
    status = trustmgr("-c", str(config), "status", "-o", "json")
    assert {r["cluster"] for r in json.loads(status.out)} == {"web-1", "web-2"}
