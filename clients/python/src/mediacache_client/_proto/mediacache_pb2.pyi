from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from typing import ClassVar as _ClassVar, Iterable as _Iterable, Mapping as _Mapping, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class PutOutcome(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    PUT_OUTCOME_UNSPECIFIED: _ClassVar[PutOutcome]
    PUT_OUTCOME_STORED: _ClassVar[PutOutcome]
    PUT_OUTCOME_TOO_LARGE: _ClassVar[PutOutcome]
    PUT_OUTCOME_QUARANTINED: _ClassVar[PutOutcome]
    PUT_OUTCOME_NOT_ADMITTED: _ClassVar[PutOutcome]
    PUT_OUTCOME_UNAVAILABLE: _ClassVar[PutOutcome]
    PUT_OUTCOME_LEASE_RELEASED: _ClassVar[PutOutcome]
PUT_OUTCOME_UNSPECIFIED: PutOutcome
PUT_OUTCOME_STORED: PutOutcome
PUT_OUTCOME_TOO_LARGE: PutOutcome
PUT_OUTCOME_QUARANTINED: PutOutcome
PUT_OUTCOME_NOT_ADMITTED: PutOutcome
PUT_OUTCOME_UNAVAILABLE: PutOutcome
PUT_OUTCOME_LEASE_RELEASED: PutOutcome

class MediaKey(_message.Message):
    __slots__ = ("origin", "media_id", "variant")
    ORIGIN_FIELD_NUMBER: _ClassVar[int]
    MEDIA_ID_FIELD_NUMBER: _ClassVar[int]
    VARIANT_FIELD_NUMBER: _ClassVar[int]
    origin: str
    media_id: str
    variant: str
    def __init__(self, origin: _Optional[str] = ..., media_id: _Optional[str] = ..., variant: _Optional[str] = ...) -> None: ...

class MediaInfo(_message.Message):
    __slots__ = ("size", "content_type", "file_name", "sha256", "stored_at_unix_ms")
    SIZE_FIELD_NUMBER: _ClassVar[int]
    CONTENT_TYPE_FIELD_NUMBER: _ClassVar[int]
    FILE_NAME_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    STORED_AT_UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    size: int
    content_type: str
    file_name: str
    sha256: bytes
    stored_at_unix_ms: int
    def __init__(self, size: _Optional[int] = ..., content_type: _Optional[str] = ..., file_name: _Optional[str] = ..., sha256: _Optional[bytes] = ..., stored_at_unix_ms: _Optional[int] = ...) -> None: ...

class GetRequest(_message.Message):
    __slots__ = ("key", "offset", "limit", "want_lease", "wait_ms")
    KEY_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    LIMIT_FIELD_NUMBER: _ClassVar[int]
    WANT_LEASE_FIELD_NUMBER: _ClassVar[int]
    WAIT_MS_FIELD_NUMBER: _ClassVar[int]
    key: MediaKey
    offset: int
    limit: int
    want_lease: bool
    wait_ms: int
    def __init__(self, key: _Optional[_Union[MediaKey, _Mapping]] = ..., offset: _Optional[int] = ..., limit: _Optional[int] = ..., want_lease: bool = ..., wait_ms: _Optional[int] = ...) -> None: ...

class Miss(_message.Message):
    __slots__ = ("lease_token",)
    LEASE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    lease_token: str
    def __init__(self, lease_token: _Optional[str] = ...) -> None: ...

class GetResponse(_message.Message):
    __slots__ = ("info", "chunk", "miss")
    INFO_FIELD_NUMBER: _ClassVar[int]
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    MISS_FIELD_NUMBER: _ClassVar[int]
    info: MediaInfo
    chunk: bytes
    miss: Miss
    def __init__(self, info: _Optional[_Union[MediaInfo, _Mapping]] = ..., chunk: _Optional[bytes] = ..., miss: _Optional[_Union[Miss, _Mapping]] = ...) -> None: ...

class PutHeader(_message.Message):
    __slots__ = ("key", "info", "lease_token", "release_lease")
    KEY_FIELD_NUMBER: _ClassVar[int]
    INFO_FIELD_NUMBER: _ClassVar[int]
    LEASE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    RELEASE_LEASE_FIELD_NUMBER: _ClassVar[int]
    key: MediaKey
    info: MediaInfo
    lease_token: str
    release_lease: bool
    def __init__(self, key: _Optional[_Union[MediaKey, _Mapping]] = ..., info: _Optional[_Union[MediaInfo, _Mapping]] = ..., lease_token: _Optional[str] = ..., release_lease: bool = ...) -> None: ...

class PutRequest(_message.Message):
    __slots__ = ("header", "chunk")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    header: PutHeader
    chunk: bytes
    def __init__(self, header: _Optional[_Union[PutHeader, _Mapping]] = ..., chunk: _Optional[bytes] = ...) -> None: ...

class PutResponse(_message.Message):
    __slots__ = ("stored", "outcome")
    STORED_FIELD_NUMBER: _ClassVar[int]
    OUTCOME_FIELD_NUMBER: _ClassVar[int]
    stored: bool
    outcome: PutOutcome
    def __init__(self, stored: bool = ..., outcome: _Optional[_Union[PutOutcome, str]] = ...) -> None: ...

class StatRequest(_message.Message):
    __slots__ = ("key",)
    KEY_FIELD_NUMBER: _ClassVar[int]
    key: MediaKey
    def __init__(self, key: _Optional[_Union[MediaKey, _Mapping]] = ...) -> None: ...

class StatResponse(_message.Message):
    __slots__ = ("found", "info", "tier", "shard")
    FOUND_FIELD_NUMBER: _ClassVar[int]
    INFO_FIELD_NUMBER: _ClassVar[int]
    TIER_FIELD_NUMBER: _ClassVar[int]
    SHARD_FIELD_NUMBER: _ClassVar[int]
    found: bool
    info: MediaInfo
    tier: str
    shard: str
    def __init__(self, found: bool = ..., info: _Optional[_Union[MediaInfo, _Mapping]] = ..., tier: _Optional[str] = ..., shard: _Optional[str] = ...) -> None: ...

class PurgeRequest(_message.Message):
    __slots__ = ("key", "all_variants", "quarantine")
    KEY_FIELD_NUMBER: _ClassVar[int]
    ALL_VARIANTS_FIELD_NUMBER: _ClassVar[int]
    QUARANTINE_FIELD_NUMBER: _ClassVar[int]
    key: MediaKey
    all_variants: bool
    quarantine: bool
    def __init__(self, key: _Optional[_Union[MediaKey, _Mapping]] = ..., all_variants: bool = ..., quarantine: bool = ...) -> None: ...

class PurgeResponse(_message.Message):
    __slots__ = ("removed",)
    REMOVED_FIELD_NUMBER: _ClassVar[int]
    removed: int
    def __init__(self, removed: _Optional[int] = ...) -> None: ...

class RingStatusRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ShardStatus(_message.Message):
    __slots__ = ("name", "address", "weight", "up", "used_memory_bytes", "keys", "share")
    NAME_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_FIELD_NUMBER: _ClassVar[int]
    UP_FIELD_NUMBER: _ClassVar[int]
    USED_MEMORY_BYTES_FIELD_NUMBER: _ClassVar[int]
    KEYS_FIELD_NUMBER: _ClassVar[int]
    SHARE_FIELD_NUMBER: _ClassVar[int]
    name: str
    address: str
    weight: int
    up: bool
    used_memory_bytes: int
    keys: int
    share: float
    def __init__(self, name: _Optional[str] = ..., address: _Optional[str] = ..., weight: _Optional[int] = ..., up: bool = ..., used_memory_bytes: _Optional[int] = ..., keys: _Optional[int] = ..., share: _Optional[float] = ...) -> None: ...

class RingStatusResponse(_message.Message):
    __slots__ = ("generation", "config_digest", "shards", "reloads_failed", "last_reload_error", "reloads_applied")
    GENERATION_FIELD_NUMBER: _ClassVar[int]
    CONFIG_DIGEST_FIELD_NUMBER: _ClassVar[int]
    SHARDS_FIELD_NUMBER: _ClassVar[int]
    RELOADS_FAILED_FIELD_NUMBER: _ClassVar[int]
    LAST_RELOAD_ERROR_FIELD_NUMBER: _ClassVar[int]
    RELOADS_APPLIED_FIELD_NUMBER: _ClassVar[int]
    generation: int
    config_digest: str
    shards: _containers.RepeatedCompositeFieldContainer[ShardStatus]
    reloads_failed: int
    last_reload_error: str
    reloads_applied: int
    def __init__(self, generation: _Optional[int] = ..., config_digest: _Optional[str] = ..., shards: _Optional[_Iterable[_Union[ShardStatus, _Mapping]]] = ..., reloads_failed: _Optional[int] = ..., last_reload_error: _Optional[str] = ..., reloads_applied: _Optional[int] = ...) -> None: ...

class StatsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class StatsResponse(_message.Message):
    __slots__ = ("uptime_seconds", "get_hits", "get_misses", "bytes_served", "bytes_received", "puts_stored", "memory_bytes", "memory_entries", "leases_granted", "lease_waiters")
    UPTIME_SECONDS_FIELD_NUMBER: _ClassVar[int]
    GET_HITS_FIELD_NUMBER: _ClassVar[int]
    GET_MISSES_FIELD_NUMBER: _ClassVar[int]
    BYTES_SERVED_FIELD_NUMBER: _ClassVar[int]
    BYTES_RECEIVED_FIELD_NUMBER: _ClassVar[int]
    PUTS_STORED_FIELD_NUMBER: _ClassVar[int]
    MEMORY_BYTES_FIELD_NUMBER: _ClassVar[int]
    MEMORY_ENTRIES_FIELD_NUMBER: _ClassVar[int]
    LEASES_GRANTED_FIELD_NUMBER: _ClassVar[int]
    LEASE_WAITERS_FIELD_NUMBER: _ClassVar[int]
    uptime_seconds: int
    get_hits: int
    get_misses: int
    bytes_served: int
    bytes_received: int
    puts_stored: int
    memory_bytes: int
    memory_entries: int
    leases_granted: int
    lease_waiters: int
    def __init__(self, uptime_seconds: _Optional[int] = ..., get_hits: _Optional[int] = ..., get_misses: _Optional[int] = ..., bytes_served: _Optional[int] = ..., bytes_received: _Optional[int] = ..., puts_stored: _Optional[int] = ..., memory_bytes: _Optional[int] = ..., memory_entries: _Optional[int] = ..., leases_granted: _Optional[int] = ..., lease_waiters: _Optional[int] = ...) -> None: ...

class PurgeOriginRequest(_message.Message):
    __slots__ = ("origin", "quarantine")
    ORIGIN_FIELD_NUMBER: _ClassVar[int]
    QUARANTINE_FIELD_NUMBER: _ClassVar[int]
    origin: str
    quarantine: bool
    def __init__(self, origin: _Optional[str] = ..., quarantine: bool = ...) -> None: ...

class PurgeOriginResponse(_message.Message):
    __slots__ = ("shard", "removed", "shards_done", "shards_total", "done")
    SHARD_FIELD_NUMBER: _ClassVar[int]
    REMOVED_FIELD_NUMBER: _ClassVar[int]
    SHARDS_DONE_FIELD_NUMBER: _ClassVar[int]
    SHARDS_TOTAL_FIELD_NUMBER: _ClassVar[int]
    DONE_FIELD_NUMBER: _ClassVar[int]
    shard: str
    removed: int
    shards_done: int
    shards_total: int
    done: bool
    def __init__(self, shard: _Optional[str] = ..., removed: _Optional[int] = ..., shards_done: _Optional[int] = ..., shards_total: _Optional[int] = ..., done: bool = ...) -> None: ...
