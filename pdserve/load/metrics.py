"""The metric-scraping plug-in: Prometheus text from a server's /metrics, parsed to (name, sorted labels) ->
value; sums over a family; and a sampler that scrapes at an interval while a load runs."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

from pdserve.load.client import Client

Samples = dict[tuple, float]


def parse(text: str) -> Samples:
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def total(samples: Samples, name: str, **labels: str) -> float:
    """The sum of `name`'s samples whose labels include `labels`."""
    return sum(v for (n, ls), v in samples.items() if n == name and labels.items() <= dict(ls).items())


async def scrape(client: Client) -> Samples | None:
    """Every sample of the client's server's /metrics; None when it does not answer."""
    try:
        status, body = await client.get("/metrics")
    except (aiohttp.ClientError, asyncio.TimeoutError):
        return None
    return parse(body.decode()) if status == 200 else None


async def scrape_all(urls: list[str | None], timeout_s: float = 5.0) -> list[Samples | None]:
    """Each URL's samples (None for None, or one that does not answer)."""
    out: list[Samples | None] = []
    for url in urls:
        if url is None:
            out.append(None)
            continue
        async with Client(url, timeout_s=timeout_s) as c:
            out.append(await scrape(c))
    return out


def scrape_now(*urls: str | None) -> Samples:
    """Blocking, for code outside an event loop: the samples of every URL that answers, merged."""
    merged: Samples = {}
    for samples in asyncio.run(scrape_all(list(urls))):
        merged |= samples or {}
    return merged


class Sampler:
    """Scrapes `url` every `interval_s` and calls `on_sample(t, samples)` (t: seconds since start) until
    cancelled; a scrape that fails is skipped. Owned by the caller's task: `async with Sampler(...)`."""

    def __init__(self, url: str, interval_s: float, on_sample: Callable[[float, Samples], None]) -> None:
        self.url, self.interval_s, self.on_sample = url, interval_s, on_sample
        self._task: asyncio.Task | None = None

    async def run(self) -> None:
        t0 = time.perf_counter()
        async with Client(self.url, timeout_s=5) as c:
            while True:
                samples = await scrape(c)
                if samples is not None:
                    self.on_sample(time.perf_counter() - t0, samples)
                await asyncio.sleep(self.interval_s)

    async def __aenter__(self) -> Sampler:
        self._task = asyncio.ensure_future(self.run())
        return self

    async def __aexit__(self, *exc) -> None:
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
