"""trustmgr's error tree. Every message is one line saying what is wrong and
what to do; none carries a key, token or passphrase.

::

    TrustmgrError
    ├── BadInputError          exit 2: the user must change something
    │   ├── ConfigError        the configuration file (all problems at once)
    │   ├── BadMaterialError   a PEM, key or certificate that is malformed or inconsistent
    │   └── StateError         the state store holds something unusable
    ├── ProviderAnswerError    exit 1: a provider answered with something trustmgr refuses
    ├── TargetError            exit 1: a target could not be read or written
    │   ├── TransientTargetError   worth retrying
    │   └── TargetConflictError    changed since it was read: read again, plan again
    └── LockedError            exit 1: another trustmgr holds the state lock
"""

from __future__ import annotations


def one_line(text: str, limit: int = 300) -> str:
    """``text`` as one line of printable characters, at most ``limit`` long: how a
    message that came from elsewhere (a server, an agent) is shown or logged."""
    text = " ".join("".join(c if c.isprintable() else " " for c in text).split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


class TrustmgrError(Exception):
    exit_code = 1


class BadInputError(TrustmgrError):
    exit_code = 2


class ConfigError(BadInputError):
    """All problems found in a configuration file, each with where it is."""

    def __init__(self, source: str, problems: list[str]) -> None:
        self.source = source
        self.problems = problems
        head = problems[0] if len(problems) == 1 else f"{len(problems)} problems"
        super().__init__(f"{source}: {head}")

    def lines(self) -> list[str]:
        return [
            f"{self.source}:{p}" if p[:1].isdigit() else f"{self.source}: {p}"
            for p in self.problems
        ]


class BadMaterialError(BadInputError):
    pass


class StateError(BadInputError):
    pass


class ProviderAnswerError(TrustmgrError):
    pass


class TargetError(TrustmgrError):
    pass


class TransientTargetError(TargetError):
    pass


class LockedError(TrustmgrError):
    pass


class TargetConflictError(TargetError):
    """The target changed between read and write; read again and re-plan."""
