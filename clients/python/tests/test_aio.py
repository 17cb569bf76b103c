"""The asyncio client against the real service and real Redis shards."""

from __future__ import annotations

import asyncio
import hashlib

import pytest

from mediacache_client import AsyncClient, Fill, Key, OutOfRange, Unavailable


def run(coro):
    return asyncio.run(coro)


def test_round_trip_range_stat_and_purge(service):
    async def scenario():
        async with AsyncClient(service.address) as client:
            key = Key("example.org", "async", "thumb/96x96/crop")
            data = bytes(range(256)) * 4096  # 1 MiB
            put = await client.put(key, data, content_type="image/webp")
            assert (put.stored, put.outcome) == (True, "stored")
            hit = await client.get(key)
            assert hit.body == data and hit.info.sha256 == hashlib.sha256(data).digest()
            assert (await client.get(key, offset=1000, limit=10)).body == data[1000:1010]
            with pytest.raises(OutOfRange):
                await client.get(key, offset=len(data) + 1)
            stat = await client.stat(key)
            assert stat.found and stat.info.content_type == "image/webp"
            assert await client.purge(key) == 1
            assert await client.get(key) is None
            assert not (await client.stat(key)).found

    run(scenario())


def test_get_or_fill_fetches_once_for_many_tasks(service):
    async def scenario():
        async with AsyncClient(service.address) as client:
            key = Key("remote.example", "async-popular")
            callers = 10
            fetches = 0

            async def fetch():
                nonlocal fetches
                fetches += 1
                # The origin answers once every other task waits for this fill.
                loop = asyncio.get_running_loop()
                deadline = loop.time() + 10
                while (await client.stats()).lease_waiters != callers - 1:
                    assert loop.time() < deadline, "the other callers never waited"
                    await asyncio.sleep(0.02)
                return Fill(b"avatar bytes", content_type="image/png")

            results = await asyncio.gather(
                *(client.get_or_fill(key, fetch, wait_ms=20_000) for _ in range(callers))
            )
            assert fetches == 1
            assert {r.body for r in results} == {b"avatar bytes"}
            assert (await client.get(key)).info.content_type == "image/png"

    run(scenario())


def test_a_failed_async_fetch_releases_the_lease_and_a_plain_function_fetches_too(cluster):
    service = cluster(extra="lease_ttl: 60s\n")

    async def scenario():
        async with AsyncClient(service.address) as a, AsyncClient(service.address) as b:
            key = Key("remote.example", "async-flaky")
            loop = asyncio.get_running_loop()
            started = loop.time()

            waiter = None

            async def failing():
                # This caller holds the lease; a second one starts waiting for its fill.
                nonlocal waiter
                waiter = asyncio.ensure_future(
                    b.get_or_fill(key, lambda: b"second", wait_ms=30_000)
                )
                while (await a.stats()).lease_waiters != 1:
                    assert loop.time() - started < 10, "no waiter"
                    await asyncio.sleep(0.02)
                raise ConnectionError("origin down")

            with pytest.raises(ConnectionError):
                await a.get_or_fill(key, failing)
            got = await waiter
            assert got.body == b"second"
            assert loop.time() - started < 10, "released at once, not after the 60 s TTL"

    run(scenario())


def test_fail_open_when_the_tier_is_down(service):
    service.stop()

    async def scenario():
        async with AsyncClient(service.address, timeout=2.0) as client:
            with pytest.raises(Unavailable):
                await client.get(Key("example.org", "x"))
            got = await client.get_or_fill(Key("example.org", "x"), lambda: b"origin")
            assert got.body == b"origin"

    run(scenario())


def test_a_pipe_shorter_than_declared_is_an_error_naming_size(service):
    from test_client import pipe_holding

    async def scenario():
        async with AsyncClient(service.address) as client:
            key = Key("example.org", "async-pipe")
            with pipe_holding(b"only this") as pipe:
                with pytest.raises(ValueError, match="^size: 100 declared, the file ended"):
                    await client.put(key, pipe, size=100)
            assert not (await client.stat(key)).found

    run(scenario())
