"""Bounded scrapes of rank 0's /metrics.

The user picks the trainer image, so whatever answers on rank 0's metrics port is untrusted:
it may answer 100 MB, never finish, or send garbage. A scrape therefore reads at most
SCRAPE_LIMIT_BYTES within one deadline (connect, headers and body together), keeps only the
`kubetune_trainer_` sample lines, and parses them in a worker thread, so the event loop that
reconciles every other job never waits on one rank's answer.
"""

from __future__ import annotations

import asyncio
import datetime

import aiohttp

from kubetune_api.crd import Progress
from kubetune_operator import status as st

SCRAPE_LIMIT_BYTES = 256 * 1024
METRIC_PREFIX = b"kubetune_trainer_"


class ScrapeError(Exception):
    """Rank 0's answer was refused (too large, not HTTP 200, too slow)."""


async def fetch_bounded(session: aiohttp.ClientSession, url: str, timeout: float,
                        limit: int = SCRAPE_LIMIT_BYTES) -> bytes:
    """GET `url`, reading at most `limit` bytes of body within `timeout` seconds in all."""
    async with asyncio.timeout(timeout):
        async with session.get(url, allow_redirects=False) as response:
            if response.status != 200:
                raise ScrapeError(f"HTTP {response.status}")
            if response.content_length is not None and response.content_length > limit:
                raise ScrapeError(f"answer of {response.content_length} bytes is over the "
                                  f"{limit}-byte limit")
            body = bytearray()
            while len(body) <= limit:
                chunk = await response.content.read(limit + 1 - len(body))
                if not chunk:
                    return bytes(body)
                body += chunk
            raise ScrapeError(f"answer is over the {limit}-byte limit")


def trainer_lines(body: bytes) -> str:
    """Only the sample lines of the trainer's own metrics (no comments, no other families)."""
    lines = (line.strip() for line in body.splitlines())
    return "\n".join(line.decode("utf-8", "replace") for line in lines
                     if line.startswith(METRIC_PREFIX)) + "\n"


def parse_body(body: bytes, now: datetime.datetime,
               previous: Progress | None = None) -> Progress | None:
    """`previous` keeps the stall watchdog's clock (lastStepTime) while the step stands."""
    return st.parse_progress(trainer_lines(body), now, previous)


async def scrape_progress(session: aiohttp.ClientSession, url: str, timeout: float,
                          now: datetime.datetime, limit: int = SCRAPE_LIMIT_BYTES,
                          previous: Progress | None = None) -> Progress | None:
    """Rank 0's progress; raises ScrapeError, aiohttp errors, TimeoutError or ValueError (a
    malformed exposition) for the caller to log and skip."""
    body = await fetch_bounded(session, url, timeout, limit)
    return await asyncio.to_thread(parse_body, body, now, previous)
