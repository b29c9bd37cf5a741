"""The configuration's building blocks, shared by the core and the providers:
a strict camelCase model, Go-style durations and the string types that need
more than ``str``. Imports nothing of trustmgr."""

from __future__ import annotations

import re
from datetime import timedelta
from typing import Annotated

from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict
from pydantic.alias_generators import to_camel

_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h|d)")
MAX_DURATION = timedelta(days=36525)
_UNIT_SECONDS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_duration(value: object) -> timedelta:
    """Parse a Go-style duration such as ``720h``, ``1h30m`` or ``90d``."""
    if isinstance(value, timedelta):
        return value
    if not isinstance(value, str) or not value:
        raise ValueError("expected a duration such as 720h, 30m or 90d")
    text = value.strip()
    pos = 0
    total = 0.0
    for match in _DURATION_PART.finditer(text):
        if match.start() != pos:
            break
        total += float(match.group(1)) * _UNIT_SECONDS[match.group(2)]
        pos = match.end()
    if pos != len(text) or pos == 0:
        raise ValueError(
            f"{value!r} is not a duration: use a number and a unit, e.g. 720h, 30m, 90d"
        )
    if total > MAX_DURATION.total_seconds():
        raise ValueError(f"{value!r} is longer than 100 years")
    return timedelta(seconds=total)


def _positive(value: timedelta) -> timedelta:
    if value <= timedelta(0):
        raise ValueError("must be greater than zero")
    return value


Duration = Annotated[timedelta, BeforeValidator(parse_duration), AfterValidator(_positive)]


def _zero_or_duration(value: object) -> timedelta:
    return timedelta(0) if value in (0, "0") else parse_duration(value)


NonNegativeDuration = Annotated[timedelta, BeforeValidator(_zero_or_duration)]
"""A duration that may be zero, written ``0``, ``0s`` or like any duration."""


def format_duration(value: timedelta) -> str:
    """A duration as it would be written in the configuration: ``24h``, ``1h30m``, ``90s``."""
    hours, rest = divmod(int(value.total_seconds()), 3600)
    minutes, seconds = divmod(rest, 60)
    text = "".join(f"{n}{unit}" for n, unit in ((hours, "h"), (minutes, "m"), (seconds, "s")) if n)
    return text or f"{value.total_seconds() * 1000:g}ms"


def at_least(minimum: timedelta, why: str) -> AfterValidator:
    """A floor for a Duration; ``why`` finishes the sentence "must be at least X, ..."."""

    def check(value: timedelta) -> timedelta:
        if value < minimum:
            raise ValueError(f"must be at least {format_duration(minimum)}, {why}")
        return value

    return AfterValidator(check)


MIN_CA_LIFETIME = timedelta(hours=1)
"""The shortest lifetime a cluster CA may be given, by any setting that decides it."""
CA_LIFETIME_FLOOR = at_least(
    MIN_CA_LIFETIME, "so that a cluster CA outlives the runs that renew it"
)


def _local_path(value: str) -> str:
    # The OS refuses a NUL in a path only when it is used, mid-run.
    if "\0" in value:
        raise ValueError("a path cannot hold a NUL character (\\0); remove it")
    if not value.strip():
        raise ValueError("a path cannot be empty")
    return value


LocalPath = Annotated[str, AfterValidator(_local_path)]
"""A file or directory of the machine trustmgr runs on; relative to the working directory."""


def _env_name(value: str) -> str:
    # Never repeats the value: it may be the secret itself, written where its name belongs.
    if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", value):
        raise ValueError(
            "must be the name of an environment variable (letters, digits and _, "
            "not starting with a digit), not its value"
        )
    return value


EnvName = Annotated[str, AfterValidator(_env_name)]
"""The name of an environment variable that holds a secret."""


def _name_value(value: str) -> str:
    if not value:
        raise ValueError("must not be empty")
    if len(value.encode()) > 64:
        raise ValueError("must be at most 64 bytes in UTF-8 (the X.509 limit)")
    return value


NameValue = Annotated[str, AfterValidator(_name_value)]
"""A commonName, organization or organizationalUnit of a certificate subject:
RFC 5280 bounds each at 64; counted in UTF-8 bytes, as cryptography does."""


def _country(value: str) -> str:
    if not re.fullmatch(r"[A-Za-z]{2}", value):
        raise ValueError("must be two ASCII letters, an ISO 3166 code such as DE")
    return value


Country = Annotated[str, AfterValidator(_country)]


class Model(BaseModel):
    """Strict, immutable, camelCase model: unknown keys are errors."""

    model_config = ConfigDict(
        extra="forbid", frozen=True, alias_generator=to_camel, populate_by_name=True
    )
