"""Credentials out of text that more people read than the job's Secrets.

A failing rank's last log lines reach its termination message (FallbackToLogsOnError), and
from there the FineTuneJob's conditions and events (`view` reads them); the trainer's output
manifest records the spec. The operator never reads the job's Secrets, so it cannot know their
values: it masks what looks like a credential instead. In the contract too: a plain
`spec.pod.env` value that looks like one is refused (spec.py), pointing to valueFrom.
"""

from __future__ import annotations

import re

MASK = "***"

# Values that are credentials whatever surrounds them.
_SHAPES: tuple[re.Pattern[str], ...] = (
    # PEM private keys, whole or cut short by the log tail.
    re.compile(r"-----BEGIN [A-Z0-9 ]*PRIVATE KEY-----.*?(?:-----END [A-Z0-9 ]*PRIVATE "
               r"KEY-----|\Z)", re.DOTALL),
    re.compile(r"\bhf_[A-Za-z0-9]{20,}\b"),  # Hugging Face
    re.compile(r"\b(?:AKIA|ASIA)[A-Z0-9]{16}\b"),  # AWS access key ids
    re.compile(r"\b(?:gh[pousr]_[A-Za-z0-9]{30,}|github_pat_[A-Za-z0-9_]{40,})\b"),  # GitHub
    re.compile(r"\bglpat-[A-Za-z0-9_-]{20,}\b"),  # GitLab
    re.compile(r"\bxox[abposr]-[A-Za-z0-9-]{10,}\b"),  # Slack
    re.compile(r"\bsk-(?:proj-|ant-)?[A-Za-z0-9_-]{20,}\b"),  # OpenAI, Anthropic
    re.compile(r"\bAIza[0-9A-Za-z_-]{35}\b"),  # Google API keys
    re.compile(r"\bya29\.[0-9A-Za-z_-]{20,}"),  # Google OAuth access tokens
    re.compile(r"\bnpm_[A-Za-z0-9]{36}\b"),  # npm
)
# Credentials after a telling prefix: the prefix stays, the value goes.
_AFTER: tuple[re.Pattern[str], ...] = (
    # NAME=value, NAME: value, "NAME": "value" for secret-sounding names.
    re.compile(r"(?i)(\b[\w.-]*(?:token|secret|passw(?:or)?d|api[_-]?key|access[_-]?key|"
               r"account[_-]?key|private[_-]?key|credentials?)[\w.-]*['\"]?\s*[=:]\s*['\"]?)"
               r"([^\s'\",;}]+)"),
    re.compile(r"(?i)\b((?:bearer|basic)\s+)[A-Za-z0-9._~+/=-]{8,}"),  # Authorization
    re.compile(r"(?i)([?&;]sig=)[^&\s'\"]+"),  # Azure SAS signatures
    re.compile(r"(?i)(SharedAccessSignature=)[^;\s'\"]+"),
    re.compile(r"(://)[^/\s@]+@"),  # userinfo: user:password@host, token@host
)


def redact(text: str) -> str:
    for shape in _SHAPES:
        text = shape.sub(MASK, text)
    for pattern in _AFTER:
        text = pattern.sub(lambda m: m.group(1) + (MASK + "@" if m.group(1) == "://" else MASK),
                           text)
    return text


def looks_like_credential(value: str) -> bool:
    """A value that would be masked on its own (a token shape, a PEM key, userinfo, a
    signature, key=value for a secret-sounding key)."""
    return redact(value) != value
