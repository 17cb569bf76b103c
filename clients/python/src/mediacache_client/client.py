"""The blocking client: one gRPC channel, safe to share between threads."""

from __future__ import annotations

from typing import BinaryIO, Callable, Optional

import grpc

from . import _common as c
from ._common import Key, Object, PutResult, Stat
from ._proto import mediacache_pb2 as pb
from ._proto import mediacache_pb2_grpc as rpc



class Client:
    """A client of the tier.

    `address` is `host:port`; with an `https://` prefix the channel speaks TLS (verified against
    the system's roots unless `tls_ca_file` is given). `token` or `token_file` is sent as
    `authorization: Bearer …`. With `tls_ca_file` the channel speaks TLS, verified against that
    CA; `tls_cert_file` and `tls_key_file` add a client certificate for servers that want one,
    and `tls_server_name` is the name to expect in the server's certificate when the address
    carries another. `timeout` (seconds) bounds every call; a Get that waits for
    another caller's fill gets its `wait_ms` on top.
    """

    def __init__(self, address: str, **settings):
        self.settings = c.Settings.build(address, **settings)
        s = self.settings
        if s.tls:
            self._channel = grpc.secure_channel(s.address, s.credentials(), options=s.options())
        else:
            self._channel = grpc.insecure_channel(s.address, options=s.options())
        self._cache = rpc.MediaCacheServiceStub(self._channel)
        self._admin = rpc.CacheAdminServiceStub(self._channel)

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _call(self, method, request, timeout: Optional[float] = None):
        try:
            return method(
                request, timeout=timeout or self.settings.timeout, metadata=self.settings.metadata()
            )
        except grpc.RpcError as e:
            raise c.error_from(e) from None

    # Reads ------------------------------------------------------------------------------------

    def _read(self, request: pb.GetRequest, write: Callable[[bytes], None]) -> c.Reading:
        """Runs one Get, handing body chunks to `write`; the Reading says how it ended.

        An error before the first message is raised; one after it (the object replaced, its
        shard gone) makes the Get a miss, as does a body shorter or longer than promised.
        """
        reading = c.Reading(request.offset, request.limit)
        timeout = self.settings.timeout + request.wait_ms / 1000
        stream = self._cache.Get(request, timeout=timeout, metadata=self.settings.metadata())
        try:
            try:
                first = next(stream, None)
            except grpc.RpcError as e:
                raise c.error_from(e) from None
            if first is None:
                raise c.ProtocolError("a Get ended without a message")
            if not reading.first(first):
                return reading
            try:
                for message in stream:
                    write(reading.chunk(message))
            except grpc.RpcError as e:
                return reading.broken(e)
            return reading.finish()
        finally:
            # Stops the stream when `write` raised; a no-op once it ended.
            stream.cancel()

    def get(self, key: Key, offset: int = 0, limit: int = 0) -> Optional[Object]:
        """The object (or `limit` bytes of it from `offset`; 0: to the end), or None on a miss."""
        parts: list = []
        return self._read(c.get_request(key, offset, limit), parts.append).object(parts)

    def get_to(self, key: Key, file: BinaryIO, offset: int = 0, limit: int = 0) -> Optional[c.Info]:
        """Writes the object (or a range of it) to `file` as it arrives; its info, or None.

        On a miss nothing usable was written: a seekable file is put back where it stood and
        truncated there; of any other file the caller must discard what it received.
        """
        start = c.position(file)
        reading = self._read(c.get_request(key, offset, limit), file.write)
        if reading.info is None and reading.received and start is not None:
            file.seek(start)
            file.truncate()
        return reading.info

    # Writes -----------------------------------------------------------------------------------

    def put(
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
        """Stores `data` (bytes, or a binary file read from where it stands).

        The size and SHA-256 go in the header, so the server stores nothing unless the body
        matches both. Refusals (quarantined, too large, shard down) are answers, not errors:
        see `PutResult.outcome`.
        """
        body = c.Body(data, size, sha256)
        header = c.put_header(key, body.size, content_type, file_name, body.sha256, lease_token)
        try:
            answer = self._call(self._cache.Put, body.messages(header))
        except c.MediaCacheError:
            body.check()  # the file's fault, when it was
            raise
        return c.put_result(answer)

    def release_lease(self, key: Key, lease_token: str) -> None:
        """Gives up a fill lease without storing anything (the origin fetch failed), so that
        callers waiting for the key get the next lease at once."""
        self._call(self._cache.Put, iter([c.release_request(key, lease_token)]))

    def get_or_fill(
        self, key: Key, fetch: Callable[[], c.FetchResult], *, wait_ms: int = c.DEFAULT_WAIT_MS
    ) -> Object:
        """The object from the cache, or from `fetch()` (the origin) stored on the way.

        Of N callers missing the same key at once, through any replica, one gets the fill lease
        and calls `fetch`; the others wait up to `wait_ms` for its Put and read the object from
        the cache. If `fetch` raises, the lease is released (a waiter gets it at once) and the
        error propagates. Whatever error the tier gives (down, slow, a token it no longer
        takes), `fetch` is called and its result returned without storing: the cache never fails
        the request; `get` shows those errors.
        """
        plan = c.fill_plan(key, wait_ms)
        result, error = None, None
        while True:
            try:
                step = plan.send(result) if error is None else plan.throw(error)
            except StopIteration as done:
                return done.value
            result, error = None, None
            try:
                result = self._fill_step(step, fetch)
            except BaseException as e:  # handed to the plan, which decides
                error = e

    def _fill_step(self, step: tuple, fetch: Callable[[], c.FetchResult]):
        kind, *args = step
        if kind == c.READ:
            return self._read(*args)
        if kind == c.FETCH:
            return fetch()
        if kind == c.RELEASE:
            return self.release_lease(*args)
        key, fill, token = args
        return self.put(
            key, fill.body, content_type=fill.content_type, file_name=fill.file_name, lease_token=token
        )

    # Lookups and purges ---------------------------------------------------------------------

    def stat(self, key: Key) -> Stat:
        return c.stat_result(self._call(self._cache.Stat, pb.StatRequest(key=c.key_proto(key))))

    def purge(self, key: Key, *, all_variants: bool = False, quarantine: bool = False) -> int:
        """Removes `key` (or every variant of its media) everywhere; the number removed. With
        `quarantine`, Puts of the media are refused for the server's quarantine TTL."""
        request = pb.PurgeRequest(
            key=c.key_proto(key), all_variants=all_variants, quarantine=quarantine
        )
        return self._call(self._cache.Purge, request).removed

    def purge_origin(
        self,
        origin: str,
        *,
        quarantine: bool = False,
        progress: Optional[Callable[[pb.PurgeOriginResponse], None]] = None,
        timeout: Optional[float] = None,
    ) -> int:
        """Removes every media of `origin` from every shard and replica; the number removed.
        `progress` sees each report (one per page of each shard's scan)."""
        request = pb.PurgeOriginRequest(origin=origin, quarantine=quarantine)
        removed = 0
        try:
            for report in self._admin.PurgeOrigin(
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

    def stats(self) -> pb.StatsResponse:
        return self._call(self._admin.Stats, pb.StatsRequest())

