"""A Synapse media storage provider backed by the tier.

In Synapse's config, before a durable provider such as S3:

    media_storage_providers:
      - module: mediacache_client.synapse.MediaCacheStorageProvider
        store_local: true
        store_remote: true
        store_synchronous: false
        config:
          address: mediacache.media.svc:50051
          token_file: /run/secrets/mediacache/token     # optional
          tls_ca_file: /run/secrets/mediacache/ca.crt   # optional: TLS
          timeout: 10s                                  # optional: bounds each call

Keys: origin is the media's server (Synapse's own `server_name` for local media), media_id is
Synapse's file id (the media id for local media; for remote media the id Synapse stored it
under), and the variant is "" for the original, `thumb/WxH/METHOD/TYPE` for a thumbnail (TYPE
with "-" for "/", e.g. `thumb/320x240/scale/image-jpeg`) and `preview` or `preview/thumb/...`
for URL-preview media.

It fails open: when the tier is down or slow, `fetch` answers "not here" and `store_file` logs
and counts (`mediacache_synapse_requests_total`); Synapse never fails a request because of
the cache. Blocking calls run on the provider's own thread pool, off Synapse's reactor.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import re
import tempfile
from typing import Any, Optional

from ._common import Key
from .client import Client

logger = logging.getLogger(__name__)

try:  # Synapse's own metrics, when Synapse is there to serve them.
    from prometheus_client import Counter

    _REQUESTS = Counter(
        "mediacache_synapse_requests_total",
        "Calls Synapse made to the mediacache storage provider, by operation and result",
        ["operation", "result"],
    )
except ImportError:  # pragma: no cover
    _REQUESTS = None

# Body bytes of a fetched object kept in memory before the copy spills to a temporary file.
SPOOL_BYTES = 1024 * 1024
_ID = re.compile(r"^[A-Za-z0-9._=-]{1,255}$")
_ORIGIN = re.compile(r"^[A-Za-z0-9.:\[\]-]{1,255}$")
_DURATION = re.compile(r"^(\d+(?:\.\d+)?)(ms|s|m|h)?$")


def _count(operation: str, result: str) -> None:
    if _REQUESTS is not None:
        _REQUESTS.labels(operation, result).inc()


@dataclasses.dataclass(frozen=True)
class ProviderConfig:
    address: str
    token_file: Optional[str] = None
    tls_ca_file: Optional[str] = None
    tls_cert_file: Optional[str] = None
    tls_key_file: Optional[str] = None
    timeout: float = 10.0
    threads: int = 20


def _config_error(message: str, key: str) -> Exception:
    """An error about `key` of the provider's config; Synapse puts the path to it in front
    (`media_storage_providers.<item 0>.config`)."""
    try:
        from synapse.config._base import ConfigError

        return ConfigError(message, path=(key,) if key else None)
    except ImportError:  # pragma: no cover
        return ValueError(f"config.{key}: {message}" if key else f"config: {message}")


def _seconds(value: Any, key: str) -> float:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        seconds = float(value)
    elif isinstance(value, str) and _DURATION.match(value.strip()):
        number, unit = _DURATION.match(value.strip()).groups()
        seconds = float(number) * {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, None: 1.0}[unit]
    else:
        raise _config_error(f"expected seconds or a duration such as 10s, got {value!r}", key)
    if not 0 < seconds <= 3600:
        raise _config_error(f"must be above 0 and at most 1h, got {value!r}", key)
    return seconds


def media_key(own_server_name: str, file_info: Any) -> Optional[Key]:
    """The tier's key for a Synapse `FileInfo`, or None when it cannot have one."""
    origin = file_info.server_name or own_server_name
    media_id = file_info.file_id
    parts = []
    if getattr(file_info, "url_cache", False):
        parts.append("preview")
    thumbnail = getattr(file_info, "thumbnail", None)
    if thumbnail is not None:
        kind = (thumbnail.type or "").replace("/", "-")
        parts += ["thumb", f"{thumbnail.width}x{thumbnail.height}", thumbnail.method or "none"]
        if kind:
            parts.append(kind)
    variant = "/".join(parts)
    if not (_ORIGIN.match(origin or "") and _ID.match(media_id or "")):
        return None
    if len(variant) > 128 or not all(_ID.match(p) for p in parts):
        return None
    return Key(origin, media_id, variant)


def _legacy_thumbnail_path(path: str, file_info: Any) -> bool:
    """Whether `path` is the method-less name Synapse also tries for remote thumbnails: the same
    object as the first try, so asking the tier again would only double a miss's cost."""
    thumbnail = getattr(file_info, "thumbnail", None)
    return (
        thumbnail is not None
        and bool(thumbnail.method)
        and not os.path.basename(path).endswith(f"-{thumbnail.method}")
    )


class MediaCacheStorageProvider:
    """See the module's documentation."""

    def __init__(self, hs: Any, config: ProviderConfig):
        from synapse.logging.context import defer_to_threadpool
        from twisted.python.threadpool import ThreadPool

        self._defer_to_threadpool = defer_to_threadpool
        self.reactor = hs.get_reactor()
        self.hs = hs
        self.server_name = hs.hostname
        self.media_store = hs.config.media.media_store_path
        self.config = config
        self.client = Client(
            config.address,
            token_file=config.token_file,
            tls_ca_file=config.tls_ca_file,
            tls_cert_file=config.tls_cert_file,
            tls_key_file=config.tls_key_file,
            timeout=config.timeout,
        )
        self._pool = ThreadPool(minthreads=1, maxthreads=config.threads, name="mediacache")
        self._pool.start()
        self._stopped = False
        self.reactor.addSystemEventTrigger("during", "shutdown", self._stop)

    def __str__(self) -> str:
        return f"MediaCacheStorageProvider[{self.config.address}]"

    def _stop(self) -> None:
        self._stopped = True
        self._pool.stop()
        self.client.close()

    @staticmethod
    def parse_config(config: Any) -> ProviderConfig:
        """Checks the provider's `config` block at Synapse's start, naming the key at fault."""
        if not isinstance(config, dict):
            raise _config_error("expected a mapping with at least `address`", "")
        known = {f.name for f in dataclasses.fields(ProviderConfig)}
        unknown = sorted(set(config) - known)
        if unknown:
            raise _config_error(f"unknown key; known keys are {sorted(known)}", unknown[0])
        address = config.get("address")
        if not isinstance(address, str) or not address.strip():
            raise _config_error("required: host:port of the mediacache service", "address")
        values: dict = {"address": address.strip()}
        for key in ("token_file", "tls_ca_file", "tls_cert_file", "tls_key_file"):
            path = config.get(key)
            if path is None:
                continue
            if not isinstance(path, str):
                raise _config_error(f"expected a file path, got {path!r}", key)
            values[key] = path
        if "timeout" in config:
            values["timeout"] = _seconds(config["timeout"], "timeout")
        if "threads" in config:
            threads = config["threads"]
            if isinstance(threads, bool) or not isinstance(threads, int) or not 1 <= threads <= 512:
                raise _config_error(f"expected a number from 1 to 512, got {threads!r}", "threads")
            values["threads"] = threads
        try:
            # The client's own checks: files readable (the token read now, so a wrong file
            # fails Synapse's start, not each request), a client certificate with its key.
            Client(values["address"], **{k: v for k, v in values.items() if k != "address"}).close()
        except ValueError as e:
            keys, _, message = str(e).partition(": ")
            key = keys.split(",")[-1].strip()
            raise _config_error(message or str(e), key if key in known else "address") from None
        return ProviderConfig(**values)

    def _in_pool(self, f, *args):
        if self._stopped:
            # A stopped pool drops new work without a word: its Deferred would never fire.
            raise RuntimeError("shutting down")
        return self._defer_to_threadpool(self.reactor, self._pool, f, *args)

    async def store_file(self, path: str, file_info: Any) -> None:
        """Copies Synapse's file at `media_store_path/path` into the tier; never raises."""
        key = media_key(self.server_name, file_info)
        if key is None:
            logger.debug("mediacache: no key for %s; not stored", path)
            _count("store", "skipped")
            return
        local = os.path.join(self.media_store, path)
        thumbnail = getattr(file_info, "thumbnail", None)
        content_type = (thumbnail.type if thumbnail is not None else None) or ""

        def put():
            with open(local, "rb") as f:
                return self.client.put(key, f, content_type=content_type)

        try:
            answer = await self._in_pool(put)
        except Exception as e:  # whatever it is, the cache must not fail the upload
            logger.warning("mediacache: could not store %s as %s: %s", path, key, e)
            _count("store", "error")
            return
        _count("store", answer.outcome)
        if not answer.stored:
            logger.info("mediacache: %s not stored: %s", key, answer.outcome)

    async def fetch(self, path: str, file_info: Any) -> Any:
        """A Responder streaming the object from the tier, or None: on a miss, and whenever the
        tier is down, slow or answers in error."""
        from synapse.media.media_storage import FileResponder

        key = media_key(self.server_name, file_info)
        if key is None or _legacy_thumbnail_path(path, file_info):
            return None

        def get():
            copy = tempfile.SpooledTemporaryFile(max_size=SPOOL_BYTES)
            try:
                info = self.client.get_to(key, copy)
            except BaseException:
                copy.close()
                raise
            if info is None:
                copy.close()
                return None
            copy.seek(0)
            return copy

        try:
            copy = await self._in_pool(get)
        except Exception as e:  # whatever it is, the answer is "not here"
            logger.warning("mediacache: could not fetch %s: %s", key, e)
            _count("fetch", "error")
            return None
        if copy is None:
            _count("fetch", "miss")
            return None
        _count("fetch", "hit")
        return FileResponder(self.hs, copy)
