"""Fetching the SPIFFE bundle of an external mesh, from a file or an HTTPS URL."""

from __future__ import annotations

import ssl
import urllib.error
import urllib.request
from pathlib import Path

from trustmgr.config import SpiffeBundleSource
from trustmgr.errors import BadInputError, TransientTargetError

MAX_BUNDLE_BYTES = 1 << 20


def fetch(source: SpiffeBundleSource, *, mesh: str, timeout: float = 10.0) -> tuple[bytes, str]:
    """The bundle's bytes and a description of where they came from."""
    if source.file is not None:
        path = Path(source.file).expanduser()
        try:
            return path.read_bytes()[:MAX_BUNDLE_BYTES], str(path)
        except OSError as exc:
            raise BadInputError(
                f"mesh {mesh}: cannot read SPIFFE bundle {path}: {exc.strerror}"
            ) from None
    assert source.url is not None
    try:
        context = ssl.create_default_context(cafile=source.ca_file)
    except (OSError, ssl.SSLError) as exc:
        raise BadInputError(
            f"mesh {mesh}: cannot use caFile {source.ca_file}: {getattr(exc, 'strerror', None) or exc}"
        ) from None
    try:
        with urllib.request.urlopen(source.url, timeout=timeout, context=context) as response:  # noqa: S310 - https only, by config validation
            return response.read(MAX_BUNDLE_BYTES), source.url
    except urllib.error.HTTPError as exc:
        raise TransientTargetError(f"mesh {mesh}: {source.url} answered HTTP {exc.code}") from None
    except (urllib.error.URLError, OSError, TimeoutError) as exc:
        reason = getattr(exc, "reason", exc)
        raise TransientTargetError(
            f"mesh {mesh}: cannot fetch SPIFFE bundle from {source.url}: {reason}"
        ) from None
