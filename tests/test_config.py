"""The configuration file: what the loader refuses, where it says so, and what
it must keep accepting."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import snapshot, trustmgr
from trustmgr.config import parse
from trustmgr.errors import ConfigError
from trustmgr.providers.base import ProviderNeedsFixError, read_secret

SECRET = "correct horse battery staple"

BASE = """\
stateStore: {file: {path: state}}
providers:
  corp:
    selfSigned: {passphraseEnv: TRUSTMGR_PASSPHRASE}
meshes:
  web:
    trustDomain: web.example
    provider: corp
    clusters:
      web-1: {directory: {path: out/web-1}}
"""

VAULT = """\
providers:
  v:
    vault:
      address: https://vault.example:8200
      auth: {token: {env: VAULT_TOKEN}}
meshes:
  web:
    trustDomain: web.example
    provider: v
    clusters:
      web-1: {directory: {path: out/web-1}}
"""


def problems(text: str) -> list[str]:
    """The lines `trustmgr validate` would print for ``text``; [] when it is valid."""
    try:
        parse(text, "trustmgr.yaml")
    except ConfigError as exc:
        return exc.lines()
    return []


def refused(text: str) -> str:
    """The one line `trustmgr validate` prints for ``text``, after checking the
    exit code and that nothing is written."""
    workdir = Path.cwd()
    (workdir / "trustmgr.yaml").write_text(text)
    before = snapshot(workdir)
    run = trustmgr("validate")
    assert run.code == 2, run.err
    assert "Traceback" not in run.err + run.out and "unexpected" not in run.err
    assert snapshot(workdir) == before
    lines = run.err.strip().splitlines()
    assert len(lines) == 1, run.err
    return lines[0]


# --- duplicate keys ----------------------------------------------------------


def test_a_duplicate_key_is_named_with_both_lines(workdir: Path) -> None:
    text = BASE + "      web-1: {directory: {path: out/elsewhere}}\n"
    assert refused(text) == (
        "trustmgr: trustmgr.yaml:11: meshes.web.clusters.web-1: "
        "duplicate key 'web-1' (also on line 10); keep only one"
    )


def test_duplicate_keys_are_reported_with_every_other_problem() -> None:
    text = BASE.replace("provider: corp", "provider: corp\n    provider: nope")
    assert problems(text) == [
        "trustmgr.yaml:9: meshes.web.provider: duplicate key 'provider' (also on line 8); "
        "keep only one",
        "trustmgr.yaml:9: meshes.web.provider: unknown provider 'nope' (known: corp)",
    ]


def test_an_explicit_key_may_override_a_merged_one() -> None:
    text = BASE.replace(
        "      web-1: {directory: {path: out/web-1}}",
        "      web-1: &c {directory: {path: out/web-1}, istio: {multiRoot: true}}\n"
        "      web-2:\n        <<: *c\n        directory: {path: out/web-2}",
    )
    assert problems(text) == []
    config = parse(text, "trustmgr.yaml")
    web2 = config.meshes["web"].clusters["web-2"]
    assert web2.directory is not None and web2.directory.path == "out/web-2"
    assert web2.istio.multi_root


# --- anchors and aliases -----------------------------------------------------

BOMB = """\
a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]
b: &b [*a,*a,*a,*a,*a,*a,*a,*a,*a]
c: &c [*b,*b,*b,*b,*b,*b,*b,*b,*b]
d: &d [*c,*c,*c,*c,*c,*c,*c,*c,*c]
e: &e [*d,*d,*d,*d,*d,*d,*d,*d,*d]
f: &f [*e,*e,*e,*e,*e,*e,*e,*e,*e]
g: &g [*f,*f,*f,*f,*f,*f,*f,*f,*f]
h: &h [*g,*g,*g,*g,*g,*g,*g,*g,*g]
i: &i [*h,*h,*h,*h,*h,*h,*h,*h,*h]
federations: [{meshes: *i}]
"""


def test_an_alias_bomb_is_refused_before_it_is_built(workdir: Path) -> None:
    line = refused(BOMB + BASE.removeprefix("stateStore: {file: {path: state}}\n"))
    assert line == (
        "trustmgr: trustmgr.yaml:10: federations[0].meshes: aliases add 926,177,086 values to this file "
        "(at most 10,000 here); use fewer aliases"
    )


def test_a_recursive_alias_is_refused(workdir: Path) -> None:
    line = refused("a: &a [1, *a]\n" + BASE)
    assert line == (
        "trustmgr: trustmgr.yaml:1: a[1]: this alias refers to a value that contains it; "
        "a configuration cannot be recursive"
    )


def test_nesting_deeper_than_any_configuration_is_refused(workdir: Path) -> None:
    line = refused(BASE + "federations: " + "[" * 400 + "]" * 400 + "\n")
    assert line == (
        "trustmgr: trustmgr.yaml:11: federations: nested deeper than 32 levels; "
        "no configuration needs that"
    )


def test_defaults_shared_by_many_clusters_stay_accepted() -> None:
    """Aliases may add as many values as the file itself holds, or 10,000."""
    clusters = "".join(
        f"      c{i}:\n        <<: *defaults\n        directory: {{path: out/c{i}}}\n"
        for i in range(600)
    )
    text = BASE.replace(
        "      web-1: {directory: {path: out/web-1}}\n",
        "      web-1: &defaults\n"
        "        directory: {path: out/web-1}\n"
        "        istio: {version: '1.24', multiRoot: true, restartIstiod: true}\n" + clusters,
    )
    config = parse(text, "trustmgr.yaml")
    assert len(config.meshes["web"].clusters) == 601
    assert all(c.istio.multi_root for c in config.meshes["web"].clusters.values())


# --- encoding and NUL characters ---------------------------------------------


def test_a_file_that_is_not_utf8_is_one_line(workdir: Path) -> None:
    (workdir / "trustmgr.yaml").write_bytes(BASE.encode().replace(b"web.ex", b"w\xe9b.ex"))
    run = trustmgr("validate")
    assert run.code == 2
    assert run.err == (
        "trustmgr: trustmgr.yaml:7: not UTF-8 text (byte 0xe9 in column 19); "
        "save the file as UTF-8\n"
    )


def test_a_control_character_in_the_file_is_one_line(workdir: Path) -> None:
    assert refused(BASE.replace("out/web-1", "out/web-1\x00")) == (
        "trustmgr: trustmgr.yaml:10: the character U+0000 cannot appear in YAML; remove it"
    )


NUL = '"x\\0y"'
PATH_FIELDS = [
    ("stateStore: {file: {path: state}}", f"stateStore: {{file: {{path: {NUL}}}}}", 1),
    ("{directory: {path: out/web-1}}", f"{{directory: {{path: {NUL}}}}}", 10),
    ("{directory: {path: out/web-1}}", f"{{kubernetes: {{kubeconfig: {NUL}}}}}", 10),
    ("{passphraseEnv: TRUSTMGR_PASSPHRASE}", f"{{passphraseFile: {NUL}}}", 4),
]


@pytest.mark.parametrize(("old", "new", "line"), PATH_FIELDS)
def test_a_nul_character_in_a_path_is_refused_with_its_line(
    old: str, new: str, line: int, workdir: Path
) -> None:
    line_printed = refused(BASE.replace(old, new))
    assert line_printed.startswith(f"trustmgr: trustmgr.yaml:{line}: ")
    assert line_printed.endswith("a path cannot hold a NUL character (\\0); remove it")


@pytest.mark.parametrize(
    "auth",
    [
        f"{{token: {{file: {NUL}}}}}",
        f"{{appRole: {{roleId: r, secretIdFile: {NUL}}}}}",
        f"{{appRole: {{roleIdFile: {NUL}, secretIdEnv: S}}}}",
        f"{{kubernetes: {{role: r, tokenPath: {NUL}}}}}",
        f"{{jwt: {{role: r, jwtFile: {NUL}}}}}",
    ],
)
def test_a_nul_character_in_a_vault_path_is_refused(auth: str) -> None:
    lines = problems(VAULT.replace("{token: {env: VAULT_TOKEN}}", auth))
    assert len(lines) == 1 and lines[0].startswith("trustmgr.yaml:5: providers.v.vault.auth.")
    assert lines[0].endswith("a path cannot hold a NUL character (\\0); remove it")


def test_a_nul_character_in_other_paths_is_refused() -> None:
    vault = VAULT.replace("auth:", f"caCert: {NUL}\n      auth:")
    assert problems(vault) == [
        "trustmgr.yaml:5: providers.v.vault.caCert: a path cannot hold a NUL character (\\0); "
        "remove it"
    ]
    external = BASE + "  ext:\n    trustDomain: ext.example\n    external:\n"
    for key in ("file", "caFile"):
        source = f"{{{key}: {NUL}}}" if key == "file" else f"{{url: 'https://x', caFile: {NUL}}}"
        lines = problems(external + f"      spiffeBundle: {source}\n")
        assert lines == [
            f"trustmgr.yaml:14: meshes.ext.external.spiffeBundle.{key}: "
            "a path cannot hold a NUL character (\\0); remove it"
        ]


def test_an_empty_path_is_refused() -> None:
    assert problems(BASE.replace("{path: out/web-1}", "{path: ''}")) == [
        "trustmgr.yaml:10: meshes.web.clusters.web-1.directory.path: a path cannot be empty"
    ]


# --- long cluster names ------------------------------------------------------


def test_a_63_character_cluster_name_bootstraps_and_verifies(workdir: Path) -> None:
    name = "c" * 63
    (workdir / "trustmgr.yaml").write_text(BASE.replace("web-1", name))
    run = trustmgr("bootstrap")
    assert run.code == 0, run.err
    assert trustmgr("verify").code == 0


def test_the_cluster_ca_common_name_fits_x509() -> None:
    from cryptography.x509.oid import NameOID

    from trustmgr.pki import cluster_ca_request
    from trustmgr.providers.keys import KeyAlgorithm

    def cn(cluster: str) -> str:
        request = cluster_ca_request(
            "t.example", cluster=cluster, algorithm=KeyAlgorithm.ECDSA_P256
        )
        (attribute,) = request.csr.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
        return str(attribute.value)

    assert cn("web-1") == "web-1 cluster CA"
    assert cn("c" * 53) == "c" * 53 + " cluster CA"
    assert cn("c" * 54) == "c" * 54
    assert cn("c" * 63) == "c" * 63


def test_a_trust_domain_too_long_for_the_subject_stays_in_the_san() -> None:
    from cryptography import x509
    from cryptography.x509.oid import NameOID

    from trustmgr.pki import cluster_ca_request
    from trustmgr.providers.keys import KeyAlgorithm

    domain = "d" * 60 + ".example"
    request = cluster_ca_request(domain, cluster="c", algorithm=KeyAlgorithm.ECDSA_P256)
    assert not request.csr.subject.get_attributes_for_oid(NameOID.ORGANIZATIONAL_UNIT_NAME)
    san = request.csr.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.UniformResourceIdentifier) == [f"spiffe://{domain}"]


# --- the self-signed root's subject ------------------------------------------


@pytest.mark.parametrize(
    ("subject", "expect"),
    [
        ("{commonName: " + "n" * 65 + "}", "subject.commonName: must be at most 64 bytes"),
        ("{commonName: " + "é" * 33 + "}", "subject.commonName: must be at most 64 bytes"),
        ("{commonName: ''}", "subject.commonName: must not be empty"),
        ("{organization: " + "o" * 65 + "}", "subject.organization: must be at most 64 bytes"),
        (
            "{organizationalUnit: " + "u" * 65 + "}",
            "subject.organizationalUnit: must be at most 64 bytes",
        ),
        ("{country: ÄÖ}", "subject.country: must be two ASCII letters"),
        ("{country: U1}", "subject.country: must be two ASCII letters"),
        ("{country: USA}", "subject.country: must be two ASCII letters"),
    ],
)
def test_a_root_subject_x509_cannot_hold_is_refused(
    subject: str, expect: str, workdir: Path
) -> None:
    text = BASE.replace(
        "{passphraseEnv: TRUSTMGR_PASSPHRASE}",
        "\n      passphraseEnv: TRUSTMGR_PASSPHRASE\n      subject: " + subject,
    )
    assert refused(text).startswith(
        f"trustmgr: trustmgr.yaml:6: providers.corp.selfSigned.{expect}"
    )


def test_cluster_ca_organization_must_fit_x509() -> None:
    text = BASE + "intermediates: {organization: " + "o" * 65 + "}\n"
    assert problems(text) == [
        "trustmgr.yaml:11: intermediates.organization: must be at most 64 bytes in UTF-8 "
        "(the X.509 limit)"
    ]


def test_a_root_subject_at_the_limits_bootstraps(workdir: Path) -> None:
    text = BASE.replace(
        "{passphraseEnv: TRUSTMGR_PASSPHRASE}",
        "\n      passphraseEnv: TRUSTMGR_PASSPHRASE\n"
        f"      subject: {{commonName: {'n' * 64}, organization: {'o' * 64}, "
        f"organizationalUnit: {'u' * 64}, country: de}}",
    )
    (workdir / "trustmgr.yaml").write_text(text)
    assert trustmgr("bootstrap").code == 0
    assert trustmgr("verify").code == 0


# --- lifetimes ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("extra", "expect"),
    [
        (
            "intermediates: {ttl: 30s, renewBefore: 10s}",
            [
                "trustmgr.yaml:11: intermediates.renewBefore: must be at least 5m",
                "trustmgr.yaml:11: intermediates.ttl: must be at least 1h",
            ],
        ),
        ("intermediates: {ttl: 59m, renewBefore: 5m}", ["intermediates.ttl: must be at least 1h"]),
        (
            "intermediates: {ttl: 1h, renewBefore: 4m59s}",
            ["intermediates.renewBefore: must be at least 5m"],
        ),
        (
            "intermediates: {ttl: 2h, renewBefore: 2h}",
            ["intermediates: renewBefore must be shorter than ttl"],
        ),
    ],
)
def test_cluster_ca_lifetimes_have_floors(extra: str, expect: list[str]) -> None:
    lines = problems(BASE + extra + "\n")
    assert len(lines) == len(expect)
    for line, part in zip(lines, expect, strict=True):
        assert part in line


def test_floors_are_inclusive() -> None:
    assert problems(BASE + "intermediates: {ttl: 1h, renewBefore: 5m}\n") == []
    root = BASE.replace("{passphraseEnv", "{ttl: 24h, passphraseEnv")
    assert problems(root) == []


def test_a_mesh_override_has_the_same_floors() -> None:
    text = BASE.replace(
        "    provider: corp\n", "    provider: corp\n    intermediates: {ttl: 10m}\n"
    )
    assert problems(text) == [
        "trustmgr.yaml:9: meshes.web.intermediates.ttl: must be at least 1h, "
        "so that a cluster CA outlives the runs that renew it"
    ]


def test_a_self_signed_root_lives_at_least_a_day() -> None:
    zero = BASE.replace("{passphraseEnv", "{ttl: 0s, passphraseEnv")
    assert problems(zero) == [
        "trustmgr.yaml:4: providers.corp.selfSigned.ttl: must be greater than zero"
    ]
    text = BASE.replace("{passphraseEnv", "{ttl: 23h, passphraseEnv")
    assert problems(text) == [
        "trustmgr.yaml:4: providers.corp.selfSigned.ttl: must be at least 24h: "
        "a root is replaced by a rotation, which takes longer than that"
    ]


def test_a_vault_ttl_ceiling_has_a_floor_and_exceeds_renew_before() -> None:
    assert problems(VAULT.replace("auth:", "ttl: 30m\n      auth:")) == [
        "trustmgr.yaml:5: providers.v.vault.ttl: must be at least 1h, "
        "so that a cluster CA outlives the runs that renew it"
    ]
    assert problems(VAULT.replace("auth:", "ttl: 240h\n      auth:")) == [
        "trustmgr.yaml:5: providers.v.vault.ttl: 240h caps the cluster CAs of mesh 'web' at "
        "no more than their renewBefore (240h), so they would be renewed on every run: "
        "raise ttl or lower renewBefore"
    ]
    assert problems(VAULT.replace("auth:", "ttl: 241h\n      auth:")) == []
    shorter = (
        VAULT.replace("auth:", "ttl: 24h\n      auth:") + "intermediates: {renewBefore: 12h}\n"
    )
    assert problems(shorter) == []
    own = shorter.replace("    provider: v\n", "    provider: v\n    intermediates: {}\n")
    assert "caps the cluster CAs of mesh 'web'" in problems(own)[0]


# --- secrets never appear in messages ----------------------------------------

ENV_FIELDS = [
    (BASE, "passphraseEnv: TRUSTMGR_PASSPHRASE", f"passphraseEnv: {SECRET}"),
    (VAULT, "env: VAULT_TOKEN", f"env: {SECRET}"),
    (
        VAULT,
        "{token: {env: VAULT_TOKEN}}",
        f"{{appRole: {{roleIdEnv: '{SECRET}', secretIdEnv: S}}}}",
    ),
    (VAULT, "{token: {env: VAULT_TOKEN}}", f"{{appRole: {{roleId: r, secretIdEnv: '{SECRET}'}}}}"),
    (VAULT, "{token: {env: VAULT_TOKEN}}", f"{{jwt: {{role: r, jwtEnv: '{SECRET}'}}}}"),
]


@pytest.mark.parametrize(("base", "old", "new"), ENV_FIELDS)
def test_a_secret_written_where_a_variable_name_belongs_is_never_shown(
    base: str, old: str, new: str, workdir: Path
) -> None:
    text = base.replace(old, new)
    (workdir / "trustmgr.yaml").write_text(text)
    for command in ("validate", "bootstrap"):
        run = trustmgr(command)
        assert run.code == 2, run.err
        assert "must be the name of an environment variable" in run.err
        assert "Traceback" not in run.err
        for part in SECRET.split():
            assert part not in run.out + run.err


def test_read_secret_shows_neither_a_missing_path_nor_a_malformed_name(
    workdir: Path,
) -> None:
    for kwargs in ({"file": SECRET}, {"env": SECRET}, {"file": "a\0" + SECRET}):
        with pytest.raises(ProviderNeedsFixError) as caught:
            read_secret("provider corp: root key passphrase", **kwargs)
        assert SECRET not in str(caught.value)
        assert str(caught.value).startswith("provider corp: root key passphrase: ")


def test_read_secret_names_a_file_that_exists(workdir: Path) -> None:
    (workdir / "empty").write_text("\n")
    (workdir / "binary").write_bytes(b"\xff\xfe")
    with pytest.raises(ProviderNeedsFixError, match=r"^s: empty is empty$"):
        read_secret("s", file="empty")
    with pytest.raises(ProviderNeedsFixError, match=r"^s: binary is not UTF-8 text$"):
        read_secret("s", file="binary")
    with pytest.raises(ProviderNeedsFixError, match=r"^s: cannot read \.: Is a directory$"):
        read_secret("s", file=".")
