"""Credentials out of text the operator copies into status and events.

A failing rank's last log lines reach its termination message (FallbackToLogsOnError), and
from there the FineTuneJob's conditions and events, which far more people may read than the
job's Secrets. The operator never reads those Secrets, so it cannot know their values: it masks
what looks like a credential instead (a Hub or AWS key, NAME=value where the name says token,
secret, password or key, a Bearer header, a password in a URL).
"""

from __future__ import annotations

import re

MASK = "***"

_PATTERNS: tuple[tuple[re.Pattern[str], str], ...] = (
    # NAME=value, NAME: value, "NAME": "value" for secret-sounding names.
    (re.compile(r"(?i)(\b[\w.-]*(?:token|secret|passw(?:or)?d|api[_-]?key|access[_-]?key|"
                r"private[_-]?key|credentials?)[\w.-]*['\"]?\s*[=:]\s*['\"]?)([^\s'\",;}]+)"),
     rf"\g<1>{MASK}"),
    (re.compile(r"\bhf_[A-Za-z0-9]{20,}\b"), MASK),  # Hugging Face tokens
    (re.compile(r"\b(?:AKIA|ASIA)[A-Z0-9]{16}\b"), MASK),  # AWS access key ids
    (re.compile(r"(?i)\b(bearer\s+)[A-Za-z0-9._~+/=-]{8,}"), rf"\g<1>{MASK}"),
    (re.compile(r"(://[^/\s:@]+:)[^/\s@]+@"), rf"\g<1>{MASK}@"),  # user:password@host
)


def redact(text: str) -> str:
    for pattern, replacement in _PATTERNS:
        text = pattern.sub(replacement, text)
    return text
