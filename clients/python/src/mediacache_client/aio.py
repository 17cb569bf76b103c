"""The asyncio client: the same calls as `Client`, awaited, over one `grpc.aio` channel."""

from __future__ import annotations

import inspect
from typing import Awaitable, BinaryIO, Callable, Optional, Union

import grpc
import grpc.aio

from . import _common as c
from ._common import Key, Object, PutResult, Stat
from ._proto import mediacache_pb2 as pb
from ._proto import mediacache_pb2_grpc as rpc


AsyncFetch = Callable[[], Union[Awaitable[c.FetchResult], c.FetchResult]]


class AsyncClient:
    """A client of the tier for asyncio programs; see `Client` for the parameters.

    Create it inside the event loop that uses it, and `await client.close()` (or use
    `async with`) when done. File reads and writes of `put` and `get_to` are blocking calls on
    the file object given.
    """

    def __init__(self, address: str, **settings):
        self.settings = c.Settings.build(address, **settings)
        s = self.settings
        if s.tls:
            self._channel = grpc.aio.secure_channel(s.address, s.credentials(), options=s.options())
        else:
            self._channel = grpc.aio.insecure_channel(s.address, options=s.options())
        self._cache = rpc.MediaCacheServiceStub(self._channel)
        self._admin = rpc.CacheAdminServiceStub(self._channel)

    async def close(self) -> None:
        await self._channel.close()

    async def __aenter__(self) -> "AsyncClient":
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    async def _call(self, method, request, timeout: Optional[float] = None):
        try:
            return await method(
                request, timeout=timeout or self.settings.timeout, metadata=self.settings.metadata()
            )
        except grpc.RpcError as e:
            raise c.error_from(e) from None

    async def _read(self, request: pb.GetRequest, write: Callable[[bytes], object]) -> c.Reading:
        reading = c.Reading(request.offset, request.limit)
        timeout = self.settings.timeout + request.wait_ms / 1000
        call = self._cache.Get(request, timeout=timeout, metadata=self.settings.metadata())
        try:
            try:
                first = await call.read()
            except grpc.RpcError as e:
                raise c.error_from(e) from None
            if first is grpc.aio.EOF:
                raise c.ProtocolError("a Get ended without a message")
            if not reading.first(first):
                return reading
            try:
                while (message := await call.read()) is not grpc.aio.EOF:
                    write(reading.chunk(message))
            except grpc.RpcError as e:
                return reading.broken(e)
            return reading.finish()
        finally:
            call.cancel()

    async def get(self, key: Key, offset: int = 0, limit: int = 0) -> Optional[Object]:
        parts: list = []
        return (await self._read(c.get_request(key, offset, limit), parts.append)).object(parts)

    async def get_to(
        self, key: Key, file: BinaryIO, offset: int = 0, limit: int = 0
    ) -> Optional[c.Info]:
        start = c.position(file)
        reading = await self._read(c.get_request(key, offset, limit), file.write)
        if reading.info is None and reading.received and start is not None:
            file.seek(start)
            file.truncate()
        return reading.info

    async def put(
        self,
        key: Key,
        data: c.Source,
        *,
        size: Optional[int] = None,
        sha256: Optional[bytes] = None,
        content_type: str = "",
        file_name: str = "",
        lease_token: str = "",
    ) -> PutResult:
        body = c.Body(data, size, sha256)
        header = c.put_header(key, body.size, content_type, file_name, body.sha256, lease_token)
        try:
            answer = await self._call(self._cache.Put, body.messages(header))
        except c.MediaCacheError:
            body.check()  # the file's fault, when it was
            raise
        return c.put_result(answer)

    async def release_lease(self, key: Key, lease_token: str) -> None:
        await self._call(self._cache.Put, iter([c.release_request(key, lease_token)]))

    async def get_or_fill(
        self, key: Key, fetch: AsyncFetch, *, wait_ms: int = c.DEFAULT_WAIT_MS
    ) -> Object:
        """As `Client.get_or_fill`; `fetch` may be a coroutine function."""

        plan = c.fill_plan(key, wait_ms)
        result, error = None, None
        while True:
            try:
                step = plan.send(result) if error is None else plan.throw(error)
            except StopIteration as done:
                return done.value
            result, error = None, None
            try:
                result = await self._fill_step(step, fetch)
            except BaseException as e:  # handed to the plan, which decides
                error = e

    async def _fill_step(self, step: tuple, fetch: AsyncFetch):
        kind, *args = step
        if kind == c.READ:
            return await self._read(*args)
        if kind == c.FETCH:
            result = fetch()
            return await result if inspect.isawaitable(result) else result
        if kind == c.RELEASE:
            return await self.release_lease(*args)
        key, fill, token = args
        return await self.put(
            key, fill.body, content_type=fill.content_type, file_name=fill.file_name, lease_token=token
        )

    async def stat(self, key: Key) -> Stat:
        request = pb.StatRequest(key=c.key_proto(key))
        return c.stat_result(await self._call(self._cache.Stat, request))

    async def purge(self, key: Key, *, all_variants: bool = False, quarantine: bool = False) -> int:
        request = pb.PurgeRequest(
            key=c.key_proto(key), all_variants=all_variants, quarantine=quarantine
        )
        return (await self._call(self._cache.Purge, request)).removed

    async def purge_origin(
        self,
        origin: str,
        *,
        quarantine: bool = False,
        progress: Optional[Callable[[pb.PurgeOriginResponse], None]] = None,
        timeout: Optional[float] = None,
    ) -> int:
        request = pb.PurgeOriginRequest(origin=origin, quarantine=quarantine)
        removed = 0
        try:
            async for report in self._admin.PurgeOrigin(
                request,
                timeout=timeout or max(self.settings.timeout, 600.0),
                metadata=self.settings.metadata(),
            ):
                removed = report.removed
                if progress is not None:
                    progress(report)
        except grpc.RpcError as e:
            raise c.error_from(e) from None
        return removed

    async def stats(self) -> pb.StatsResponse:
        return await self._call(self._admin.Stats, pb.StatsRequest())
