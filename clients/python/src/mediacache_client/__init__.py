"""Client of the mediacache gRPC cache tier.

    from mediacache_client import Client, Key
    with Client("127.0.0.1:50051") as cache:
        cache.put(Key("example.org", "AbCdEf"), b"...", content_type="image/png")
        hit = cache.get(Key("example.org", "AbCdEf"))   # an Object, or None on a miss

`AsyncClient` (in `mediacache_client.aio`) has the same calls for asyncio;
`mediacache_client.synapse.MediaCacheStorageProvider` is a Synapse media storage provider.
"""

from ._common import (
    Fill,
    Info,
    InvalidArgument,
    Key,
    MediaCacheError,
    Object,
    OutOfRange,
    PermissionDenied,
    ProtocolError,
    PutResult,
    Stat,
    Unauthenticated,
    Unavailable,
)
from .aio import AsyncClient
from .client import Client

__all__ = [
    "AsyncClient",
    "Client",
    "Fill",
    "Info",
    "InvalidArgument",
    "Key",
    "MediaCacheError",
    "Object",
    "OutOfRange",
    "PermissionDenied",
    "ProtocolError",
    "PutResult",
    "Stat",
    "Unauthenticated",
    "Unavailable",
]
