"""Documentation made from the project's own data: the config reference from the schema.

`python -m soraflow.workflow.docs README.md` rewrites the block between the reference markers,
and a test fails when the README and the schema disagree.
"""

from __future__ import annotations

import sys
from importlib import resources
from pathlib import Path

import yaml

START, END = "<!-- config-reference:start -->", "<!-- config-reference:end -->"


def load_schema() -> dict:
    return yaml.safe_load(resources.files("soraflow.workflow").joinpath("schemas/config.schema.yaml").read_text())


def _type_of(spec: dict, defs: dict) -> str:
    if "$ref" in spec:
        spec = defs[spec["$ref"].rsplit("/", 1)[-1]]
    if "enum" in spec:
        return " \\| ".join(f"`{v}`" for v in spec["enum"])
    kind = spec.get("type", "object" if "properties" in spec else "")
    return " or ".join(kind) if isinstance(kind, list) else kind


def _rows(spec: dict, defs: dict, prefix: str) -> list[str]:
    if "$ref" in spec:
        spec = {**defs[spec["$ref"].rsplit("/", 1)[-1]], **{k: v for k, v in spec.items() if k != "$ref"}}
    rows = []
    required = set(spec.get("required", []))
    for name, child in spec.get("properties", {}).items():
        key = f"{prefix}.{name}" if prefix else name
        description = child.get("description", "")
        if "$ref" in child and not description:
            description = defs[child["$ref"].rsplit("/", 1)[-1]].get("description", "")
        mark = "yes" if name in required else ""
        rows.append(f"| `{key}` | {_type_of(child, defs)} | {mark} | {' '.join(description.split())} |")
        resolved = defs[child["$ref"].rsplit("/", 1)[-1]] if "$ref" in child else child
        if "properties" in resolved:
            rows += _rows(child, defs, key)
        elif resolved.get("type") == "array" and "properties" in resolved.get("items", {}):
            rows += _rows(resolved["items"], defs, key + "[]")
        elif isinstance(resolved.get("additionalProperties"), dict) and "$ref" in resolved["additionalProperties"]:
            rows += _rows(resolved["additionalProperties"], defs, key + ".<name>")  # e.g. stages.<name>
    return rows


def config_reference() -> str:
    schema = load_schema()
    lines = ["| key | type | required | meaning |", "| --- | --- | --- | --- |"]
    return "\n".join(lines + _rows(schema, schema.get("$defs", {}), ""))


def replace_reference(text: str) -> str:
    before, rest = text.split(START, 1)
    _, after = rest.split(END, 1)
    return f"{before}{START}\n{config_reference()}\n{END}{after}"


if __name__ == "__main__":
    readme = Path(sys.argv[1] if len(sys.argv) > 1 else "README.md")
    readme.write_text(replace_reference(readme.read_text()))
