"""The blocking client against the real service and real Redis shards."""

from __future__ import annotations

import hashlib
import io
import os
import threading
import time

import pytest

from conftest import eventually
from mediacache_client._common import Settings, outcome_name
from mediacache_client import (
    Client,
    Fill,
    InvalidArgument,
    Key,
    OutOfRange,
    Unavailable,
)


def body(n: int, seed: int = 0) -> bytes:
    return bytes((i * 31 + seed) % 251 for i in range(n))


@pytest.mark.parametrize("size", [0, 1, 256 * 1024, 256 * 1024 + 1, 3 * 1024 * 1024 + 7])
def test_round_trip_keeps_bytes_and_digest(client, size):
    key = Key("example.org", f"rt{size}", "")
    data = body(size, size)
    put = client.put(key, data, content_type="image/png", file_name="cat.png")
    assert (put.stored, put.outcome) == (True, "stored")
    hit = client.get(key)
    assert hit is not None
    assert hit.body == data
    assert hit.info.size == size
    assert hit.info.sha256 == hashlib.sha256(data).digest()
    assert (hit.info.content_type, hit.info.file_name) == ("image/png", "cat.png")
    out = io.BytesIO()
    info = client.get_to(key, out)
    assert info is not None and out.getvalue() == data


def test_ranges_and_an_offset_past_the_end(client):
    key = Key("example.org", "ranged", "thumb/32x32/crop")
    data = body(1_000_000, 3)
    assert client.put(key, data).stored
    assert client.get(key, offset=10, limit=100).body == data[10:110]
    tail = client.get(key, offset=999_990)
    assert tail.body == data[999_990:] and tail.info.size == len(data)
    with pytest.raises(OutOfRange):
        client.get(key, offset=2_000_000)


def test_put_from_files_sends_size_and_digest(client, tmp_path):
    data = body(700_000, 5)
    path = tmp_path / "media.bin"
    path.write_bytes(b"skipped" + data)
    with open(path, "rb") as f:
        f.seek(7)  # a file is sent from where it stands
        assert client.put(Key("example.org", "file"), f).stored
    assert client.get(Key("example.org", "file")).body == data

    # A pipe cannot be read twice: the size must be given, and is checked.
    read_end, write_end = os.pipe()
    writer = threading.Thread(target=lambda: (os.write(write_end, data), os.close(write_end)))
    writer.start()
    with os.fdopen(read_end, "rb") as pipe:
        assert client.put(Key("example.org", "pipe"), pipe, size=len(data)).stored
    writer.join()
    assert client.get(Key("example.org", "pipe")).body == data
    with pytest.raises(ValueError, match="size"):
        client.put(Key("example.org", "seekable"), io.BufferedReader(io.BytesIO(data)), size=1)


def pipe_holding(data: bytes):
    """The read end of a pipe that `data` is written into (then closed) by a thread."""
    read_end, write_end = os.pipe()

    def write():
        with os.fdopen(write_end, "wb") as w:
            w.write(data)

    threading.Thread(target=write, daemon=True).start()
    return os.fdopen(read_end, "rb")


@pytest.mark.parametrize("declared, held", [(10, 1000), (1000, 10), (0, 5), (300_000, 299_999)])
def test_a_pipe_that_does_not_hold_its_size_stores_nothing(client, declared, held):
    key = Key("example.org", f"pipe-{declared}-{held}")
    with pipe_holding(body(held, 2)) as pipe:
        with pytest.raises(ValueError, match=f"^size: {declared} declared, the file"):
            client.put(key, pipe, size=declared)
    assert not client.stat(key).found


def test_the_digest_goes_in_the_header(client):
    """A file that changes between the hashing pass and the sending pass is refused by the
    server: the digest it checks is the one the client declared."""

    class ChangesWhenRewound(io.BytesIO):
        def seek(self, *args):
            at = super().seek(*args)
            with self.getbuffer() as view:
                view[0] ^= 0xFF
            return at

    key = Key("example.org", "changed")
    with pytest.raises(InvalidArgument) as err:
        client.put(key, ChangesWhenRewound(body(1000, 4)))
    assert err.value.field == "info.sha256"
    assert not client.stat(key).found


def test_bad_input_names_the_field_and_stores_nothing(client):
    with pytest.raises(InvalidArgument) as err:
        client.put(Key("example.org", "digest"), b"abc", sha256=b"\0" * 32)
    assert err.value.field == "info.sha256"
    assert not client.stat(Key("example.org", "digest")).found
    with pytest.raises(InvalidArgument) as err:
        client.get(Key("bad origin!", "x"))
    assert err.value.field.startswith("key.origin"), err.value.details


def test_stat_purge_quarantine_and_origin_purge(client):
    key = Key("spam.example", "m1")
    thumb = Key("spam.example", "m1", "thumb/32x32/crop")
    assert client.put(key, b"original").stored
    assert client.put(thumb, b"thumb").stored
    stat = client.stat(thumb)
    assert stat.found and stat.tier == "redis" and stat.shard.startswith("shard-")
    assert stat.info.size == 5
    assert client.purge(key, all_variants=True, quarantine=True) == 2
    assert client.get(thumb) is None
    refused = client.put(key, b"again")
    assert (refused.stored, refused.outcome) == (False, "quarantined")

    for i in range(5):
        assert client.put(Key("gone.example", f"m{i}"), b"x").stored
    reports = []
    assert client.purge_origin("gone.example", progress=reports.append) == 5
    assert reports and reports[-1].done and reports[-1].shards_total == 2
    assert all(client.get(Key("gone.example", f"m{i}")) is None for i in range(5))


def test_a_stream_ending_in_error_is_a_miss(cluster, tmp_path):
    service = cluster(shards=1)
    key = Key("example.org", "big")
    data = body(24 * 1024 * 1024, 9)
    with Client(service.address) as client:
        assert client.put(key, data).stored

        class KillsTheShard(io.BytesIO):
            """Kills the only shard when the first chunk arrives, mid-stream."""

            def write(self, chunk):
                if self.tell() == 0 and chunk:
                    service.shards[0].kill()
                return super().write(chunk)

        out = KillsTheShard()
        assert client.get_to(key, out) is None
        # What had arrived is not left behind as if it were the object.
        assert out.getvalue() == b""


def test_get_or_fill_fetches_once_for_many_callers(client):
    key = Key("remote.example", "popular")
    data = body(300_000, 1)
    callers = 8
    fetches = []

    def fetch():
        fetches.append(threading.get_ident())
        # The origin is slow: it answers once every other caller is waiting for this fill.
        eventually("the other callers waiting", lambda: client.stats().lease_waiters == callers - 1)
        return Fill(data, content_type="image/jpeg")

    results = [None] * callers

    def call(i):
        results[i] = client.get_or_fill(key, fetch, wait_ms=20_000)

    threads = [threading.Thread(target=call, args=(i,)) for i in range(callers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(fetches) == 1
    assert all(r.body == data and r.info.content_type == "image/jpeg" for r in results)
    assert client.get(key).body == data


def second_caller(holder, client, key, fill: bytes):
    """Starts a caller of `client` filling `key` with `fill` while `holder` holds the lease, and
    returns once it waits: its thread, and what it got and how long it waited once done."""
    got = {}

    def call():
        started = time.monotonic()
        got["object"] = client.get_or_fill(key, lambda: fill, wait_ms=30_000)
        got["waited"] = time.monotonic() - started

    thread = threading.Thread(target=call)
    thread.start()
    eventually("a waiter", lambda: holder.stats().lease_waiters == 1)
    return thread, got


def test_a_failed_fetch_releases_the_lease_at_once(cluster):
    service = cluster(extra="lease_ttl: 60s\n")
    key = Key("remote.example", "flaky")
    with Client(service.address) as a, Client(service.address) as b:
        waiting = []

        def failing_fetch():
            waiting.append(second_caller(a, b, key, b"from the waiter"))
            raise ConnectionError("origin down")

        with pytest.raises(ConnectionError):
            a.get_or_fill(key, failing_fetch)
        thread, got = waiting[0]
        thread.join()
        assert got["object"].body == b"from the waiter"
        assert got["waited"] < 10, f"released at once, not after the 60 s TTL: {got['waited']}"
        assert a.get(key).body == b"from the waiter"


def test_a_refused_fill_hands_the_lease_on_at_once(cluster):
    """The filler's Put carries its lease token: refused (too large), it still gives the lease
    up, so a waiting caller fills at once instead of after the 60 s lease TTL."""
    service = cluster(extra="lease_ttl: 60s\nmax_object_bytes: 100\n")
    key = Key("remote.example", "huge")
    with Client(service.address) as a, Client(service.address) as b:
        waiting = []

        def too_large():
            waiting.append(second_caller(a, b, key, b"small enough"))
            return b"x" * 200

        assert a.get_or_fill(key, too_large).body == b"x" * 200
        thread, got = waiting[0]
        thread.join()
        assert got["object"].body == b"small enough"
        assert got["waited"] < 10, f"handed on at once, not after the TTL: {got['waited']}"


def test_fail_open_when_the_tier_is_down(service):
    with Client(service.address, timeout=2.0) as client:
        service.stop()
        with pytest.raises(Unavailable) as err:
            client.get(Key("example.org", "x"))
        assert err.value.transient
        filled = client.get_or_fill(Key("example.org", "x"), lambda: b"origin bytes")
        assert filled.body == b"origin bytes"
        assert filled.info.sha256 == hashlib.sha256(b"origin bytes").digest()


def test_settings_are_checked_with_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="^address"):
        Client("")
    with pytest.raises(ValueError, match="^token_file: cannot read"):
        Client("127.0.0.1:1", token_file=str(tmp_path / "missing"))
    with pytest.raises(ValueError, match="^tls_cert_file, tls_key_file"):
        Client("127.0.0.1:1", tls_ca_file=__file__, tls_cert_file=__file__)
    with pytest.raises(ValueError, match="^timeout"):
        Client("127.0.0.1:1", timeout=0)
    # https:// means TLS, against the system's roots when no CA file is given.
    assert Settings.build("https://cache.example:443").tls
    assert not Settings.build("http://127.0.0.1:1").tls


def test_an_outcome_newer_than_the_client_has_a_name():
    assert outcome_name(6) == "lease_released"
    assert outcome_name(99) == "unknown_99"
