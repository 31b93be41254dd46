"""The chart's values table: every key of values.schema.json with its `# --` comment from
values.yaml, its type and default. tests/chart checks charts/kubetune/README.md holds exactly
this table; regenerate it with

    .venv/bin/python tests/chart/values_doc.py --write
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

CHART = Path(__file__).resolve().parents[2] / "charts" / "kubetune"
START, END = "<!-- values:start -->", "<!-- values:end -->"
KEY_LINE = re.compile(r"^(?P<indent> *)(?P<key>[A-Za-z_][A-Za-z0-9_]*):(?:\s|$)")


@dataclass(frozen=True)
class Key:
    path: str
    line: int
    doc: str  # the `# --` comment, joined; "" when there is none


def schema_paths(schema: dict[str, Any], prefix: str = "") -> dict[str, dict[str, Any]]:
    """Dotted path -> schema of every property the schema declares (recursively)."""
    out = {}
    for name, sub in schema.get("properties", {}).items():
        path = f"{prefix}{name}"
        out[path] = sub
        out.update(schema_paths(sub, f"{path}."))
    return out


def value_keys(text: str) -> dict[str, Key]:
    """Every mapping key of values.yaml (block style), by dotted path, with its comment."""
    keys: dict[str, Key] = {}
    stack: list[tuple[int, str]] = []
    comment: list[str] = []
    for number, line in enumerate(text.splitlines(), 1):
        stripped = line.strip()
        if not stripped:
            comment = []
            continue
        if stripped.startswith("#"):
            comment.append(stripped.lstrip("#").strip())
            continue
        match = KEY_LINE.match(line)
        if match is None:  # list items, flow values, continuation lines
            comment = []
            continue
        indent = len(match["indent"])
        while stack and stack[-1][0] >= indent:
            stack.pop()
        stack.append((indent, match["key"]))
        path = ".".join(key for _, key in stack)
        doc_lines = comment[next((i for i, c in enumerate(comment) if c.startswith("--")),
                                 len(comment)):]
        doc = " ".join(doc_lines).removeprefix("--").strip()
        keys[path] = Key(path, number, doc)
        comment = []
    return keys


def default_of(values: dict[str, Any], path: str) -> Any:
    node: Any = values
    for part in path.split("."):
        node = node[part]
    return node


def table() -> str:
    schema = json.loads((CHART / "values.schema.json").read_text())
    text = (CHART / "values.yaml").read_text()
    keys, values = value_keys(text), yaml.safe_load(text)
    rows = ["| Key | Type | Default | Description |", "| --- | --- | --- | --- |"]
    for path, sub in schema_paths(schema).items():
        if path not in keys:
            continue
        kind = sub.get("type", "")
        kind = " or ".join(kind) if isinstance(kind, list) else kind
        default = "" if "properties" in sub else \
            f"`{json.dumps(default_of(values, path), separators=(', ', ': '))}`"
        doc = keys[path].doc.replace("|", "\\|")
        rows.append(f"| `{path}` | {kind} | {default} | {doc} |")
    return "\n".join(rows)


def render_readme(readme: str) -> str:
    head, rest = readme.split(START, 1)
    _, tail = rest.split(END, 1)
    return f"{head}{START}\n{table()}\n{END}{tail}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--write", action="store_true", help="update charts/kubetune/README.md")
    args = parser.parse_args(argv)
    readme = CHART / "README.md"
    if args.write:
        readme.write_text(render_readme(readme.read_text()))
    else:
        print(table())
    return 0


if __name__ == "__main__":
    sys.exit(main())
