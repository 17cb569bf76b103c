"""What the sync and asyncio clients share: keys, results, errors, channel settings and requests."""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
from typing import BinaryIO, Iterator, NamedTuple, Optional, Union

import grpc

from ._proto import mediacache_pb2 as pb

logger = logging.getLogger("mediacache_client")

# Chunk size of a Put's body messages (the server accepts up to 4 MiB messages).
PUT_CHUNK_BYTES = 256 * 1024

# The HTTP/2 settings the README asks clients to advertise: 1 MiB frames and a 4 MiB stream
# window, so a 256 KiB chunk is one frame and a download does not stall on window updates.
# gRPC core sizes the connection window itself (BDP probing, on by default).
CHANNEL_OPTIONS = [
    ("grpc.http2.max_frame_size", 1024 * 1024),
    ("grpc.http2.lookahead_bytes", 4 * 1024 * 1024),
    ("grpc.max_receive_message_length", 8 * 1024 * 1024),
    ("grpc.max_send_message_length", 8 * 1024 * 1024),
    ("grpc.keepalive_time_ms", 30_000),
]

DEFAULT_TIMEOUT = 30.0
DEFAULT_WAIT_MS = 10_000


class Key(NamedTuple):
    """One stored object: an origin server, a media id and a variant ("" for the original)."""

    origin: str
    media_id: str
    variant: str = ""

    def to_proto(self) -> pb.MediaKey:
        return pb.MediaKey(origin=self.origin, media_id=self.media_id, variant=self.variant)


def key_proto(key) -> pb.MediaKey:
    """The wire form of a `Key`, or of a plain (origin, media_id[, variant]) tuple."""
    return Key(*key).to_proto()


@dataclasses.dataclass(frozen=True)
class Info:
    """What the cache knows of an object besides its bytes."""

    size: int
    content_type: str = ""
    file_name: str = ""
    sha256: bytes = b""
    stored_at_unix_ms: int = 0

    @classmethod
    def from_proto(cls, info: pb.MediaInfo) -> "Info":
        return cls(
            size=info.size,
            content_type=info.content_type,
            file_name=info.file_name,
            sha256=bytes(info.sha256),
            stored_at_unix_ms=info.stored_at_unix_ms,
        )


@dataclasses.dataclass(frozen=True)
class Object:
    """A hit: the whole object's info and the bytes of the range asked for."""

    info: Info
    body: bytes


@dataclasses.dataclass(frozen=True)
class PutResult:
    stored: bool
    # "stored", "too_large", "quarantined", "not_admitted", "unavailable" or "lease_released".
    outcome: str


@dataclasses.dataclass(frozen=True)
class Stat:
    found: bool
    info: Optional[Info]
    # "memory" or "redis" when found.
    tier: str
    # The shard holding the object (redis tier only).
    shard: str


@dataclasses.dataclass(frozen=True)
class Fill:
    """What a `get_or_fill` fetch returns when it knows more than the bytes."""

    body: bytes
    content_type: str = ""
    file_name: str = ""


FetchResult = Union[bytes, Fill]


def outcome_name(value: int) -> str:
    """`stored`, `too_large`, …; an outcome newer than this client is `unknown_N`."""
    try:
        return pb.PutOutcome.Name(value).removeprefix("PUT_OUTCOME_").lower()
    except ValueError:
        return f"unknown_{value}"


# Errors ---------------------------------------------------------------------------------------


class MediaCacheError(Exception):
    """An RPC failed. `code` is the gRPC status code, `details` the server's message.

    `transient` errors (the tier down, slow or overloaded) are worth treating as a miss and
    retrying later; the others are a wrong request or a wrong setup.
    """

    transient = False

    def __init__(self, code: grpc.StatusCode, details: str):
        super().__init__(f"{code.name}: {details}")
        self.code = code
        self.details = details


class Unavailable(MediaCacheError):
    """The tier or the object's shard cannot be reached, or did not answer in time."""

    transient = True


class InvalidArgument(MediaCacheError):
    """The request is malformed; `field` names the field the server objected to."""

    @property
    def field(self) -> str:
        return self.details.split(":", 1)[0] if ":" in self.details else ""


class OutOfRange(MediaCacheError):
    """A Get's offset is past the end of the object."""


class Unauthenticated(MediaCacheError):
    """The bearer token is missing or not valid."""


class PermissionDenied(MediaCacheError):
    """The token may not make this call (a read-only token on a write)."""


class ProtocolError(MediaCacheError):
    """The server answered something this client does not understand."""

    def __init__(self, details: str):
        super().__init__(grpc.StatusCode.INTERNAL, details)


_BY_CODE = {
    grpc.StatusCode.UNAVAILABLE: Unavailable,
    grpc.StatusCode.DEADLINE_EXCEEDED: Unavailable,
    grpc.StatusCode.RESOURCE_EXHAUSTED: Unavailable,
    grpc.StatusCode.ABORTED: Unavailable,
    grpc.StatusCode.CANCELLED: Unavailable,
    grpc.StatusCode.INVALID_ARGUMENT: InvalidArgument,
    grpc.StatusCode.OUT_OF_RANGE: OutOfRange,
    grpc.StatusCode.UNAUTHENTICATED: Unauthenticated,
    grpc.StatusCode.PERMISSION_DENIED: PermissionDenied,
}


def error_from(err: grpc.RpcError) -> MediaCacheError:
    code = err.code() if hasattr(err, "code") else grpc.StatusCode.UNKNOWN
    details = (err.details() if hasattr(err, "details") else None) or str(err)
    return _BY_CODE.get(code, MediaCacheError)(code, details)


# Connection settings ---------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Settings:
    """How to reach the tier; see `Client` for the parameters."""

    address: str
    token: Optional[str] = None
    tls_ca_file: Optional[str] = None
    tls_cert_file: Optional[str] = None
    tls_key_file: Optional[str] = None
    tls_server_name: Optional[str] = None
    timeout: float = DEFAULT_TIMEOUT
    # An `https://` address: TLS even without `tls_ca_file` (then against the system's roots).
    https: bool = False

    @classmethod
    def build(
        cls,
        address: str,
        *,
        token: Optional[str] = None,
        token_file: Optional[str] = None,
        tls_ca_file: Optional[str] = None,
        tls_cert_file: Optional[str] = None,
        tls_key_file: Optional[str] = None,
        tls_server_name: Optional[str] = None,
        timeout: float = DEFAULT_TIMEOUT,
    ) -> "Settings":
        if not address:
            raise ValueError("address: required, e.g. 127.0.0.1:50051")
        https = address.startswith("https://")
        for scheme in ("http://", "https://"):
            if address.startswith(scheme):
                address = address[len(scheme) :]
        if token is not None and token_file is not None:
            raise ValueError("token, token_file: give one, not both")
        if token_file is not None:
            try:
                with open(token_file, encoding="utf-8") as f:
                    token = f.read().strip()
            except OSError as e:
                raise ValueError(f"token_file: cannot read {token_file}: {e}") from e
            if not token:
                raise ValueError(f"token_file: {token_file} is empty")
        if (tls_cert_file is None) != (tls_key_file is None):
            raise ValueError("tls_cert_file, tls_key_file: a client certificate needs both")
        if tls_cert_file is not None and tls_ca_file is None:
            raise ValueError("tls_ca_file: required with a client certificate")
        for name, path in (
            ("tls_ca_file", tls_ca_file),
            ("tls_cert_file", tls_cert_file),
            ("tls_key_file", tls_key_file),
        ):
            if path is not None and not os.access(path, os.R_OK):
                raise ValueError(f"{name}: cannot read {path}")
        if not timeout > 0:
            raise ValueError(f"timeout: must be above 0 seconds, got {timeout}")
        return cls(
            address, token, tls_ca_file, tls_cert_file, tls_key_file, tls_server_name, timeout, https
        )

    @property
    def tls(self) -> bool:
        return self.https or self.tls_ca_file is not None

    def credentials(self) -> grpc.ChannelCredentials:
        def read(path: Optional[str]) -> Optional[bytes]:
            if path is None:
                return None
            with open(path, "rb") as f:
                return f.read()

        return grpc.ssl_channel_credentials(
            root_certificates=read(self.tls_ca_file),
            private_key=read(self.tls_key_file),
            certificate_chain=read(self.tls_cert_file),
        )

    def options(self) -> list:
        options = list(CHANNEL_OPTIONS)
        if self.tls_server_name:
            options.append(("grpc.ssl_target_name_override", self.tls_server_name))
        return options

    def metadata(self) -> tuple:
        if self.token is None:
            return ()
        return (("authorization", f"Bearer {self.token}"),)


# Requests ---------------------------------------------------------------------------------------


def get_request(
    key: Key, offset: int = 0, limit: int = 0, want_lease: bool = False, wait_ms: int = 0
) -> pb.GetRequest:
    if offset < 0 or limit < 0:
        raise ValueError("offset, limit: must not be negative")
    return pb.GetRequest(
        key=key_proto(key), offset=offset, limit=limit, want_lease=want_lease, wait_ms=wait_ms
    )


def put_header(
    key: Key,
    size: int,
    content_type: str,
    file_name: str,
    sha256: Optional[bytes],
    lease_token: str,
) -> pb.PutRequest:
    info = pb.MediaInfo(
        size=size, content_type=content_type, file_name=file_name, sha256=sha256 or b""
    )
    header = pb.PutHeader(key=key_proto(key), info=info, lease_token=lease_token)
    return pb.PutRequest(header=header)


def release_request(key: Key, lease_token: str) -> pb.PutRequest:
    if not lease_token:
        raise ValueError("lease_token: required to release a lease")
    return pb.PutRequest(
        header=pb.PutHeader(key=key_proto(key), lease_token=lease_token, release_lease=True)
    )


Source = Union[bytes, bytearray, memoryview, BinaryIO]


class Body:
    """A Put's body: the size and SHA-256 to declare, and the messages to send.

    Bytes are hashed here. A seekable file is read once to hash it (unless `sha256` is given)
    and then again to send it, from where it stood; a pipe needs `size`, and its digest is then
    checked only if the caller gives one. A file that turns out to hold fewer or more bytes than
    declared ends the stream short of the declared size, so the server stores nothing, and
    `error` says why (gRPC would swallow an exception raised while sending).
    """

    def __init__(self, data: Source, size: Optional[int], sha256: Optional[bytes]):
        self.error: Optional[ValueError] = None
        if isinstance(data, (bytes, bytearray, memoryview)):
            view = memoryview(data).cast("B")
            if size is not None and size != len(view):
                raise ValueError(f"size: {size} given, the body is {len(view)} bytes")
            self.size = len(view)
            self.sha256 = sha256 if sha256 is not None else hashlib.sha256(view).digest()
            self._chunks = lambda: (
                bytes(view[i : i + PUT_CHUNK_BYTES]) for i in range(0, len(view), PUT_CHUNK_BYTES)
            )
            return
        self._file = data
        self._measured = False
        start = position(data)
        if start is not None and (size is None or sha256 is None):
            hasher = hashlib.sha256()
            total = 0
            while block := data.read(PUT_CHUNK_BYTES):
                hasher.update(block)
                total += len(block)
            data.seek(start)
            if size is not None and size != total:
                raise ValueError(f"size: {size} given, the file holds {total} bytes")
            size, sha256, self._measured = total, sha256 or hasher.digest(), True
        if size is None:
            raise ValueError("size: required for a file that cannot seek")
        if size < 0:
            raise ValueError(f"size: must not be negative, got {size}")
        self.size, self.sha256 = size, sha256
        self._chunks = self._file_chunks

    def _longer(self) -> bool:
        """Whether the file holds more than the declared size (it was read up to it)."""
        if self._measured or not self._file.read(1):
            return False
        self.error = ValueError(f"size: {self.size} declared, the file holds more")
        return True

    def _file_chunks(self) -> Iterator[bytes]:
        left = self.size
        while left > 0:
            block = self._file.read(min(PUT_CHUNK_BYTES, left))
            if not block:
                self.error = ValueError(
                    f"size: {self.size} declared, the file ended {left} bytes early"
                )
                return
            left -= len(block)
            # The last block waits until the file is seen to end there.
            if left == 0 and self._longer():
                return
            yield block

    def messages(self, header: pb.PutRequest) -> Iterator[pb.PutRequest]:
        if self.size == 0 and hasattr(self, "_file") and self._longer():
            return  # no header: an empty body cannot be cut short
        yield header
        for chunk in self._chunks():
            yield pb.PutRequest(chunk=chunk)

    def check(self) -> None:
        """Raises what went wrong with the file, if anything did."""
        if self.error is not None:
            raise self.error


def position(file) -> Optional[int]:
    """Where a seekable file stands; None for one that cannot seek."""
    try:
        return file.tell() if file.seekable() else None
    except (AttributeError, OSError):
        return None


def put_result(answer: pb.PutResponse) -> PutResult:
    return PutResult(stored=answer.stored, outcome=outcome_name(answer.outcome))


def stat_result(answer: pb.StatResponse) -> Stat:
    return Stat(
        found=answer.found,
        info=Info.from_proto(answer.info) if answer.found else None,
        tier=answer.tier,
        shard=answer.shard,
    )


def fill_parts(filled: FetchResult) -> Fill:
    if isinstance(filled, Fill):
        return filled
    if isinstance(filled, (bytes, bytearray, memoryview)):
        return Fill(bytes(filled))
    raise TypeError(f"fetch: must return bytes or Fill, got {type(filled).__name__}")


def filled_object(fill: Fill) -> Object:
    body = fill.body
    info = Info(
        size=len(body),
        content_type=fill.content_type,
        file_name=fill.file_name,
        sha256=hashlib.sha256(body).digest(),
    )
    return Object(info, body)


class Reading:
    """The state of one Get stream as its messages arrive (shared by both clients).

    `first` takes the first message: a miss (with or without a lease token) or the info of a
    hit. The body chunks then go to `chunk`; `finish` tells whether exactly the bytes the info
    and the range promise arrived. Anything else means the stream is not a whole object: a
    miss, by the contract.
    """

    def __init__(self, offset: int, limit: int):
        self.offset = offset
        self.limit = limit
        self.info: Optional[Info] = None
        self.lease_token = ""
        self.received = 0

    def first(self, message: pb.GetResponse) -> bool:
        """True for a hit."""
        kind = message.WhichOneof("kind")
        if kind == "miss":
            self.lease_token = message.miss.lease_token
            return False
        if kind == "info":
            self.info = Info.from_proto(message.info)
            return True
        raise ProtocolError(f"a Get answered {kind!r} first")

    def chunk(self, message: pb.GetResponse) -> bytes:
        if message.WhichOneof("kind") != "chunk":
            raise ProtocolError("a Get sent something other than a chunk after its info")
        self.received += len(message.chunk)
        return message.chunk

    def expected(self) -> int:
        assert self.info is not None
        rest = max(self.info.size - self.offset, 0)
        return min(rest, self.limit) if self.limit else rest

    def broken(self, error: Exception) -> "Reading":
        """The stream ended in error after its first message: a miss."""
        logger.debug("a Get ended in error after its info, so it is a miss: %s", error)
        self.info = None
        return self

    def finish(self) -> "Reading":
        """The stream ended: a miss unless exactly the promised bytes arrived."""
        if self.received != self.expected():
            logger.warning("a Get sent %d of %d bytes; a miss", self.received, self.expected())
            self.info = None
        return self

    def object(self, parts: list) -> Optional[Object]:
        return None if self.info is None else Object(self.info, b"".join(parts))


# get_or_fill, written once for both clients: a generator that yields the calls to make and is
# sent their results (or thrown their errors) by the client driving it.
READ, FETCH, RELEASE, PUT = "read", "fetch", "release", "put"


def fill_plan(key: Key, wait_ms: int):
    """The lease dance of `get_or_fill`; returns the Object the caller gets."""
    parts: list = []
    request = get_request(key, want_lease=True, wait_ms=wait_ms)
    try:
        reading = yield (READ, request, parts.append)
    except MediaCacheError as e:
        # Fail open, whatever the tier's error (down, slow, a token it no longer takes): the
        # origin answers; nothing is stored.
        logger.warning("cache unavailable, fetching %s from the origin: %s", key, e)
        return filled_object(fill_parts((yield (FETCH,))))
    if reading.info is not None:
        return reading.object(parts)
    token = reading.lease_token
    try:
        fill = fill_parts((yield (FETCH,)))
    except BaseException:
        if token:
            try:
                yield (RELEASE, key, token)
            except MediaCacheError as e:
                logger.warning("could not release the lease of %s: %s", key, e)
        raise
    try:
        answer = yield (PUT, key, fill, token)
        if not answer.stored:
            logger.info("fill of %s not stored: %s", key, answer.outcome)
    except MediaCacheError as e:
        logger.warning("fill of %s not stored: %s", key, e)
    return filled_object(fill)
