"""OCI references (`registry.example.com/team/adapter:v1`) as spec.output.oci takes them.

The grammar is the distribution project's reference grammar (distribution/reference
regexp.go), less two conveniences that would surprise here: the registry host is never implied
(no silent docker.io), and a digest is never given (the trainer computes it and reports it).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

_COMPONENT = r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*"
_DOMAIN_COMPONENT = r"(?:[a-zA-Z0-9]|[a-zA-Z0-9][a-zA-Z0-9-]*[a-zA-Z0-9])"
_HOST = rf"(?:{_DOMAIN_COMPONENT}(?:\.{_DOMAIN_COMPONENT})*|\[[0-9a-fA-F:]+\])"
REFERENCE = re.compile(rf"(?P<registry>{_HOST}(?::[0-9]+)?)/(?P<repository>{_COMPONENT}"
                       rf"(?:/{_COMPONENT})*)(?::(?P<tag>[\w][\w.-]{{0,127}}))?")
DEFAULT_TAG = "latest"
MAX_REPOSITORY = 255  # distribution's NameTotalLengthMax


@dataclass(frozen=True)
class OciReference:
    registry: str  # host[:port]
    repository: str
    tag: str

    def __str__(self) -> str:
        return f"{self.registry}/{self.repository}:{self.tag}"

    def by_digest(self, digest: str) -> str:
        return f"{self.registry}/{self.repository}@{digest}"


def parse_reference(text: str) -> OciReference:
    """host[:port]/path[:tag] -> OciReference; ValueError saying what is wrong otherwise."""
    if "@" in text:
        raise ValueError(f"{text!r}: give a tag, not a digest (the digest of what is pushed is "
                         "computed and recorded in status.output.oci.digest)")
    match = REFERENCE.fullmatch(text)
    if match is None:
        raise ValueError(f"{text!r} is not an OCI reference of the form "
                         "registry.example.com[:port]/repository[:tag] (lowercase repository "
                         "path; tag of letters, digits, '_', '.', '-')")
    registry = match["registry"]
    if not ("." in registry or ":" in registry or registry == "localhost"):
        raise ValueError(f"{text!r}: name the registry host first ({registry!r} is read as a "
                         f"repository path; e.g. docker.io/{registry}/... for Docker Hub)")
    if len(match["repository"]) > MAX_REPOSITORY:
        raise ValueError(f"{text!r}: repository longer than {MAX_REPOSITORY} characters")
    return OciReference(registry, match["repository"], match["tag"] or DEFAULT_TAG)
