"""docs/helm.md's values reference is generated from the chart's values.schema.json,
and the schema's defaults are values.yaml's. Regenerate the reference with

    python -m tests.test_chart_docs
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import yaml

from tests.conftest import REPO

CHART = REPO / "charts" / "trustmgr"
DOC = REPO / "docs" / "helm.md"
BEGIN = (
    "<!-- values reference: generated from charts/trustmgr/values.schema.json "
    "by `python -m tests.test_chart_docs`; edit the schema, not this table -->"
)
END = "<!-- end of values reference -->"

Schema = dict[str, Any]


def schema() -> Schema:
    loaded: Schema = json.loads((CHART / "values.schema.json").read_text())
    return loaded


def _is_section(node: Schema) -> bool:
    """An object whose keys the schema lists, documented key by key."""
    return (
        node.get("type") == "object"
        and node.get("additionalProperties") is False
        and bool(node.get("properties"))
    )


def leaves(node: Schema, prefix: str = "") -> Iterator[tuple[str, Schema]]:
    """(dotted key, schema) of every value a user sets, in the schema's order."""
    for key, child in node.get("properties", {}).items():
        if key == "global":
            continue
        path = f"{prefix}{key}"
        if _is_section(child) and "default" not in child:
            yield from leaves(child, path + ".")
        else:
            yield path, child


def _type(node: Schema) -> str:
    if "enum" in node:
        return ", ".join(f"`{v}`" for v in node["enum"])
    declared = node.get("type", "any")
    kinds: list[str] = declared if isinstance(declared, list) else [declared]
    words = {"array": "list", "object": "map"}
    text = " or ".join(words.get(k, k) for k in kinds)
    if node.get("pattern") == r"^([0-9]+(ms|s|m|h|d))+$":
        text = "duration"
    if "minimum" in node or "maximum" in node:
        low, high = node.get("minimum"), node.get("maximum")
        text += f" {low if low is not None else ''}–{high if high is not None else ''}"
    return text


def _default(node: Schema) -> str:
    if "default" not in node:
        return "required" if node.get("type") == "object" else ""
    value = node["default"]
    if value == "":
        return '`""`'
    return f"`{json.dumps(value, separators=(', ', ': '))}`"


def _escape(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def reference() -> str:
    """The values reference table, as docs/helm.md holds it."""
    rows = ["| key | type | default | meaning |", "|---|---|---|---|"]
    for key, node in leaves(schema()):
        rows.append(
            f"| `{key}` | {_escape(_type(node))} | {_escape(_default(node))} | "
            f"{_escape(node.get('description', ''))} |"
        )
    return "\n".join(rows)


def _documented() -> str:
    text = DOC.read_text()
    assert BEGIN in text and END in text, "docs/helm.md has lost its values reference markers"
    return text.split(BEGIN, 1)[1].split(END, 1)[0].strip()


def test_docs_values_reference_matches_the_schema() -> None:
    assert _documented() == reference(), "run `python -m tests.test_chart_docs`"


def test_every_value_is_described() -> None:
    for key, node in leaves(schema()):
        assert node.get("description"), key


def _values_leaves(values: Any, schema_node: Schema, prefix: str = "") -> Iterator[tuple[str, Any]]:
    for key, value in values.items():
        child = schema_node.get("properties", {}).get(key)
        assert child is not None, f"values.yaml has {prefix}{key}, which the schema does not know"
        if _is_section(child) and "default" not in child:
            yield from _values_leaves(value, child, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value


def test_schema_defaults_are_the_values_file() -> None:
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    in_values = dict(_values_leaves(values, schema()))
    in_schema = {key: node.get("default") for key, node in leaves(schema())}
    assert in_values == in_schema


if __name__ == "__main__":
    text = DOC.read_text()
    head, rest = text.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    DOC.write_text(f"{head}{BEGIN}\n\n{reference()}\n\n{END}{tail}")
    print(f"wrote the values reference of {DOC.relative_to(REPO)}")
