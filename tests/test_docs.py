"""The README promises what the project does: its config reference matches the schema."""

from __future__ import annotations

from pathlib import Path

from soraflow.workflow.docs import END, START, config_reference, load_schema, replace_reference

REPO = Path(__file__).resolve().parents[1]


def test_readme_config_reference_is_current():
    readme = (REPO / "README.md").read_text()
    assert replace_reference(readme) == readme, "run: python -m soraflow.workflow.docs README.md"


def test_reference_lists_nested_keys_with_descriptions():
    reference = config_reference()
    assert "| `stages.<name>.filters.min_seconds` |" in reference
    assert "| `data.root` | string | yes | folder for tables, clips and caches |" in reference


def test_schema_has_no_yaml_accidents():
    """A comma inside an unquoted flow-style description silently becomes a null key."""

    def nulls(node, path=""):
        if isinstance(node, dict):
            for key, value in node.items():
                if value is None and key != "default":  # a null default is meant
                    yield f"{path}/{key}"
                else:
                    yield from nulls(value, f"{path}/{key}")
        elif isinstance(node, list):
            for i, value in enumerate(node):
                yield from nulls(value, f"{path}[{i}]")

    assert list(nulls(load_schema())) == []


def test_readme_names_both_commands():
    readme = (REPO / "README.md").read_text()
    assert "make demo" in readme and "make test" in readme
    assert START in readme and END in readme
