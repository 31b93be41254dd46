"""Read a FineTuneJob YAML and report every problem as `file:line: field: message`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from kubetune_api.spec import KIND, FineTuneJob


class SpecError(ValueError):
    """A FineTuneJob that cannot run; the message names the file, line and field, and
    `fields` lists the dotted field paths (`spec.method.quantization`) it found at fault."""

    def __init__(self, message: str, fields: tuple[str, ...] = ()) -> None:
        super().__init__(message)
        self.fields = fields


def load_job(path: str | Path, output_uri: str | None = None) -> FineTuneJob:
    """`output_uri` (a command line's --output) replaces spec.output.uri, and so also
    satisfies a file that has no spec.output at all."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise SpecError(f"{path}: cannot read: {exc.strerror}") from None
    return parse_job(text, source=str(path), output_uri=output_uri)


def parse_job(text: str, source: str = "<string>", output_uri: str | None = None
              ) -> FineTuneJob:
    try:
        nodes = list(yaml.compose_all(text, Loader=yaml.SafeLoader))
        docs = list(yaml.safe_load_all(text))
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{source}:{mark.line + 1}" if mark else source
        raise SpecError(f"{where}: invalid YAML: {getattr(exc, 'problem', exc)}") from None
    jobs = [(d, n) for d, n in zip(docs, nodes, strict=True)
            if isinstance(d, dict) and d.get("kind", KIND) == KIND]
    if len(jobs) != 1:
        raise SpecError(f"{source}: expected exactly one {KIND} document, found {len(jobs)}")
    data, node = jobs[0]
    if output_uri is not None:
        _set_output_uri(data, output_uri)
    return validate_job(data, source=source, node=node)


def _set_output_uri(data: dict[str, Any], uri: str) -> None:
    spec = data.get("spec")
    if not isinstance(spec, dict):
        return  # validation names the missing spec
    output = spec.get("output")
    spec["output"] = {**output, "uri": uri} if isinstance(output, dict) else {"uri": uri}


# The spec is rendered into the job's ConfigMap (YAML, defaults made explicit: about twice the
# JSON), which the API server caps at 1 MiB: a larger spec is refused before any work on it.
MAX_SPEC_BYTES = 384 * 1024


def validate_job(data: dict[str, Any], source: str = "<object>",
                 node: yaml.Node | None = None) -> FineTuneJob:
    """Validate a parsed object (from YAML or from the API server)."""
    size = len(json.dumps(data.get("spec"), separators=(",", ":"), default=str))
    if size > MAX_SPEC_BYTES:
        raise SpecError(f"{source}: spec: {size} bytes as JSON; at most {MAX_SPEC_BYTES} (the "
                        "job's ConfigMap must stay under the API server's 1 MiB)")
    try:
        return FineTuneJob.model_validate(data)
    except ValidationError as exc:
        errors = exc.errors()
        raise SpecError("\n".join(_describe(err, source, node) for err in errors),
                        fields=tuple(dict.fromkeys(_field(err) for err in errors))) from None


def _location(err: Any) -> list[str]:
    loc = [str(p) for p in err["loc"]]
    # Literal/union errors carry a tag as the last loc element (e.g. 'list[str]'); drop it.
    while loc and not _is_key(loc[-1]):
        loc.pop()
    return loc


def _field(err: Any) -> str:
    return ".".join(_location(err)) or "(document)"


def _describe(err: Any, source: str, node: yaml.Node | None) -> str:
    loc = _location(err)
    field = _field(err)
    message = str(err["msg"]).removeprefix("Value error, ")
    if err["type"] in {"literal_error", "enum", "int_parsing", "float_parsing", "bool_parsing"}:
        message += f" (got {err['input']!r})"
    line = _line_of(node, loc)
    where = f"{source}:{line}" if line else source
    return f"{where}: {field}: {message}"


def _is_key(part: str) -> bool:
    return part.isdigit() or (part.replace("_", "").replace("-", "").isalnum()
                              and not part.startswith(("list[", "literal[")))


def _line_of(node: yaml.Node | None, loc: list[str]) -> int | None:
    """1-based line of the deepest YAML node on the path `loc`."""
    if node is None:
        return None
    line = node.start_mark.line + 1
    for key in loc:
        child = None
        if isinstance(node, yaml.MappingNode):
            child = next((v for k, v in node.value if k.value == key), None)
            if child is not None:
                line = child.start_mark.line + 1
        elif isinstance(node, yaml.SequenceNode) and key.isdigit() and int(key) < len(node.value):
            child = node.value[int(key)]
            line = child.start_mark.line + 1
        if child is None:
            break
        node = child
    return line
