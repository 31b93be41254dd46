"""Bounded scrapes of rank 0 (scrape.py) against hostile HTTP endpoints on loopback.

The endpoints are raw asyncio servers, so they can misbehave below HTTP libraries: lie about
their length, stream forever, stall after the headers, answer garbage."""

from __future__ import annotations

import asyncio
import datetime
import time
from collections.abc import AsyncIterator, Awaitable, Callable

import aiohttp
import pytest

from kubetune_api import contract
from kubetune_operator.scrape import (
    SCRAPE_LIMIT_BYTES,
    ScrapeError,
    scrape_progress,
    trainer_lines,
)

NOW = datetime.datetime(2026, 1, 1, tzinfo=datetime.UTC)
GOOD = (f"# HELP {contract.METRIC_STEP} steps\n# TYPE {contract.METRIC_STEP} gauge\n"
        f'{contract.METRIC_STEP}{{rank="0"}} 30\n{contract.METRIC_TOTAL_STEPS}{{rank="0"}} 120\n'
        'python_gc_objects_collected_total{generation="0"} 1.0\n'
        'unrelated_metric{le="+Inf" broken syntax here\n').encode()
Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


class Endpoint:
    def __init__(self, handler: Handler) -> None:
        self.handler, self.sent = handler, 0
        self.server: asyncio.Server | None = None
        self.tasks: set[asyncio.Task[None]] = set()

    @property
    def url(self) -> str:
        assert self.server is not None
        return f"http://127.0.0.1:{self.server.sockets[0].getsockname()[1]}/metrics"

    async def __aenter__(self) -> Endpoint:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self.server is not None
        self.server.close()
        for task in list(self.tasks):  # connections still served (a stalled answer)
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        await self.server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)
        try:
            await reader.readuntil(b"\r\n\r\n")
            await self.handler(reader, writer)
        except (ConnectionError, asyncio.CancelledError):
            pass
        finally:
            writer.close()


def answer(body: bytes, headers: str = "") -> Handler:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        length = "" if "Content-Length" in headers else f"Content-Length: {len(body)}\r\n"
        writer.write(f"HTTP/1.1 200 OK\r\n{length}{headers}\r\n".encode() + body)
        await writer.drain()
    return handler


def endless(endpoint_box: list[Endpoint], total: int = 100 * 2**20) -> Handler:
    """100 MB in chunks, no length given: only reading stops it."""
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n")
        line = f'{contract.METRIC_STEP}{{rank="0"}} 1\n'.encode() * 1024
        while endpoint_box[0].sent < total:
            writer.write(line)
            endpoint_box[0].sent += len(line)
            await writer.drain()
    return handler


async def stall(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\nkubetune_trainer_step 1\n")
    await writer.drain()
    await asyncio.sleep(3600)


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as client:
        yield client


async def test_a_normal_answer_gives_progress(session: aiohttp.ClientSession) -> None:
    async with Endpoint(answer(GOOD)) as endpoint:
        progress = await scrape_progress(session, endpoint.url, 5.0, NOW)
    assert progress is not None and (progress.step, progress.total_steps) == (30, 120)


def test_only_trainer_samples_are_parsed() -> None:
    assert trainer_lines(GOOD) == (f'{contract.METRIC_STEP}{{rank="0"}} 30\n'
                                   f'{contract.METRIC_TOTAL_STEPS}{{rank="0"}} 120\n')


async def test_a_hundred_megabytes_are_never_read(session: aiohttp.ClientSession) -> None:
    box: list[Endpoint] = []
    endpoint = Endpoint(endless(box))
    box.append(endpoint)
    async with endpoint:
        with pytest.raises(ScrapeError, match="over the 262144-byte limit"):
            await scrape_progress(session, endpoint.url, 10.0, NOW)
    # The scraper stopped reading at the limit (socket buffers hold a few MB at most).
    assert SCRAPE_LIMIT_BYTES < endpoint.sent < 16 * 2**20


async def test_an_announced_huge_answer_is_refused_before_reading(
        session: aiohttp.ClientSession) -> None:
    async with Endpoint(answer(b"x" * 1024, "Content-Length: 104857600\r\n")) as endpoint:
        with pytest.raises(ScrapeError, match="104857600 bytes"):
            await scrape_progress(session, endpoint.url, 5.0, NOW)


async def test_an_answer_that_never_finishes_times_out(session: aiohttp.ClientSession) -> None:
    async with Endpoint(stall) as endpoint:  # headers, then silence for good
        with pytest.raises(TimeoutError):  # without the deadline, the read waits forever
            await scrape_progress(session, endpoint.url, 0.5, NOW)


@pytest.mark.parametrize("body", [
    b"\x00\xff garbage \x89PNG\r\n",
    b"kubetune_trainer_step{rank=\"0\" 12\n",  # the trainer's prefix, broken syntax
    b"<html>not metrics</html>",
])
async def test_garbage_gives_no_progress_or_a_value_error(session: aiohttp.ClientSession,
                                                          body: bytes) -> None:
    async with Endpoint(answer(body)) as endpoint:
        try:
            progress = await scrape_progress(session, endpoint.url, 5.0, NOW)
        except ValueError:
            return
    assert progress is None


async def test_errors_and_redirects_are_refused(session: aiohttp.ClientSession) -> None:
    async def redirect(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"HTTP/1.1 302 Found\r\nLocation: http://169.254.169.254/\r\n"
                     b"Content-Length: 0\r\n\r\n")
        await writer.drain()
    async with Endpoint(redirect) as endpoint:
        with pytest.raises(ScrapeError, match="HTTP 302"):
            await scrape_progress(session, endpoint.url, 5.0, NOW)


async def test_the_event_loop_stays_free_while_a_rank_misbehaves(
        session: aiohttp.ClientSession) -> None:
    """Ticks of the loop every 10 ms while three hostile scrapes run: none is late by 1 s."""
    box: list[Endpoint] = []
    flood = Endpoint(endless(box))
    box.append(flood)
    lateness: list[float] = []

    async def ticker(stop: asyncio.Event) -> None:
        while not stop.is_set():
            before = time.monotonic()
            await asyncio.sleep(0.01)
            lateness.append(time.monotonic() - before - 0.01)

    async with flood, Endpoint(stall) as slow, Endpoint(answer(b"\xff" * 200_000)) as junk:
        stop = asyncio.Event()
        tick = asyncio.create_task(ticker(stop))
        results = await asyncio.gather(
            *(scrape_progress(session, url, 2.0, NOW) for url in (flood.url, slow.url,
                                                                   junk.url)),
            return_exceptions=True)
        stop.set()
        await tick
    assert isinstance(results[0], ScrapeError) and isinstance(results[1], TimeoutError)
    assert lateness and max(lateness) < 1.0, max(lateness)
