"""Pytest fixtures for the Kubernetes API emulator in :mod:`tests.kube_emulator`.

Register with ``pytest_plugins = ["tests.kube_fixtures"]`` (or import them in conftest.py).
Every emulator a fixture starts is stopped at teardown, and teardown fails if the emulator hit
an internal bug (``KubeEmulator.errors``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest
from urllib3 import Retry

from tests.kube_emulator import KubeEmulator, stop_many

__all__ = [
    "KubeEmulatorFactory",
    "kube_client",
    "kube_emulator",
    "kube_emulator_factory",
    "new_api_client",
]

KubeEmulatorFactory = Callable[..., KubeEmulator]


def new_api_client(
    emulator: KubeEmulator,
    *,
    context: str = "emulator",
    retries: int | Retry | None = None,
    token: str | None = None,
) -> Any:
    """An official-client ``ApiClient`` configured from ``emulator.kubeconfig(context)``,
    presenting ``token`` if given (else the emulator's own).

    ``retries`` goes to urllib3.  None keeps urllib3's default ``Retry(3)``: it resends
    idempotent requests (GET, PUT, DELETE) after a dropped connection or read timeout, and any
    request answered 413/429/503 with a ``Retry-After`` header.  False raises the first error.
    Close the client.
    """
    from kubernetes import client, config

    configuration = client.Configuration()
    config.load_kube_config_from_dict(  # type: ignore[no-untyped-call]
        emulator.kubeconfig(context, token=token),
        context=context,
        client_configuration=configuration,
        persist_config=False,
    )
    configuration.retries = retries
    return client.ApiClient(configuration)


def _check_healthy(emulators: list[KubeEmulator]) -> None:
    errors = [error for emulator in emulators for error in emulator.errors]
    assert not errors, f"kube emulator internal errors: {errors!r}"


@pytest.fixture
def kube_emulator_factory() -> Iterator[KubeEmulatorFactory]:
    """Start emulators with ``KubeEmulator`` keyword arguments; all stop at teardown."""
    started: list[KubeEmulator] = []

    def start(**kwargs: Any) -> KubeEmulator:
        emulator = KubeEmulator(**kwargs)
        emulator.start()
        started.append(emulator)
        return emulator

    yield start
    stop_many(started)
    _check_healthy(started)


@pytest.fixture
def kube_emulator(kube_emulator_factory: KubeEmulatorFactory) -> KubeEmulator:
    """One running emulated cluster with namespaces default, kube-system and istio-system."""
    return kube_emulator_factory()


@pytest.fixture
def kube_client(kube_emulator: KubeEmulator) -> Iterator[Any]:
    """An official-client ``ApiClient`` talking to :func:`kube_emulator`."""
    api_client = new_api_client(kube_emulator)
    yield api_client
    api_client.close()
