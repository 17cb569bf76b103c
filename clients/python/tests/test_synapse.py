"""A real Synapse (SQLite, loopback only) with the tier as its media storage provider."""

from __future__ import annotations

import hashlib
import hmac
import io
import json
import pathlib
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.request

import pytest
import yaml
from PIL import Image

from conftest import eventually, free_port
from mediacache_client import Client, Key
from mediacache_client.synapse import MediaCacheStorageProvider, _legacy_thumbnail_path, media_key

SERVER_NAME = "test.local"
SECRET = "shared-secret-for-the-test"


def http(method: str, url: str, body: bytes = b"", headers: dict = None, timeout: float = 30):
    """(status, headers, body) of one request; errors are answers too."""
    request = urllib.request.Request(url, data=body or None, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as r:
            return r.status, dict(r.headers), r.read()
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), e.read()


class Synapse:
    def __init__(self, workdir: pathlib.Path, tier_address: str):
        self.dir = workdir / "synapse"
        self.dir.mkdir()
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.media_store = self.dir / "media_store"
        config = {
            "server_name": SERVER_NAME,
            "pid_file": str(self.dir / "homeserver.pid"),
            "listeners": [
                {
                    "port": self.port,
                    "bind_addresses": ["127.0.0.1"],
                    "type": "http",
                    "tls": False,
                    "x_forwarded": False,
                    "resources": [{"names": ["client", "media"], "compress": False}],
                }
            ],
            "database": {"name": "sqlite3", "args": {"database": str(self.dir / "homeserver.db")}},
            "media_store_path": str(self.media_store),
            "signing_key_path": str(self.dir / "signing.key"),
            "registration_shared_secret": SECRET,
            "macaroon_secret_key": "macaroon-secret-for-the-test",
            "form_secret": "form-secret-for-the-test",
            "report_stats": False,
            "trusted_key_servers": [],
            "suppress_key_server_warning": True,
            "url_preview_enabled": False,
            "dynamic_thumbnails": False,
            "media_storage_providers": [
                {
                    "module": "mediacache_client.synapse.MediaCacheStorageProvider",
                    "store_local": True,
                    "store_remote": True,
                    "store_synchronous": True,
                    "config": {"address": tier_address, "timeout": "3s"},
                }
            ],
        }
        self.config = self.dir / "homeserver.yaml"
        self.config.write_text(yaml.safe_dump(config))
        self.log = self.dir / "synapse.log"
        subprocess.run(
            [sys.executable, "-m", "synapse.app.homeserver", "-c", str(self.config),
             "--generate-keys"],
            check=True,
            capture_output=True,
        )
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "synapse.app.homeserver", "-c", str(self.config)],
                stdout=log,
                stderr=log,
                cwd=self.dir,
            )

        def up():
            if self.proc.poll() is not None:
                pytest.fail(f"synapse exited: {self.log.read_text()[-3000:]}")
            try:
                return http("GET", f"{self.base}/_matrix/client/versions", timeout=2)[0] == 200
            except OSError:
                return False

        eventually("synapse answering", up, timeout=120)

    def register(self, user: str, password: str) -> str:
        """A new user's access token, through the shared-secret admin API."""
        _, _, body = http("GET", f"{self.base}/_synapse/admin/v1/register")
        nonce = json.loads(body)["nonce"]
        mac = hmac.new(SECRET.encode(), digestmod=hashlib.sha1)
        mac.update(b"\x00".join([nonce.encode(), user.encode(), password.encode(), b"notadmin"]))
        payload = {"nonce": nonce, "username": user, "password": password, "mac": mac.hexdigest(),
                   "admin": False}
        status, _, body = http("POST", f"{self.base}/_synapse/admin/v1/register",
                               json.dumps(payload).encode(), {"Content-Type": "application/json"})
        assert status == 200, body
        return json.loads(body)["access_token"]

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()


@pytest.fixture
def synapse_and_tier(cluster, tmp_path):
    service = cluster()
    synapse = Synapse(tmp_path, service.address)
    yield synapse, service
    synapse.stop()


def png(size: int = 64) -> bytes:
    image = Image.new("RGB", (size, size))
    for x in range(size):
        for y in range(size):
            image.putpixel((x, y), (x * 4 % 256, y * 4 % 256, (x + y) % 256))
    out = io.BytesIO()
    image.save(out, format="PNG")
    return out.getvalue()


def test_media_goes_through_the_tier_and_synapse_survives_its_loss(synapse_and_tier):
    synapse, service = synapse_and_tier
    token = synapse.register("alice", "alice-password")
    auth = {"Authorization": f"Bearer {token}"}
    picture = png()

    status, _, body = http("POST", f"{synapse.base}/_matrix/media/v3/upload?filename=cat.png",
                           picture, {**auth, "Content-Type": "image/png"})
    assert status == 200, body
    media_id = json.loads(body)["content_uri"].rsplit("/", 1)[1]

    tier = Client(service.address)
    original = tier.get(Key(SERVER_NAME, media_id))
    assert original is not None and original.body == picture
    # Synapse made thumbnails at upload; they are variants of the same media.
    thumb_key = Key(SERVER_NAME, media_id, "thumb/32x32/crop/image-png")
    thumb = eventually("the 32x32 thumbnail in the tier", lambda: tier.get(thumb_key))
    assert thumb.body[:8] == b"\x89PNG\r\n\x1a\n"

    # Synapse's own copies go away: what it serves now comes from the tier.
    for directory in ("local_content", "local_thumbnails"):
        shutil.rmtree(synapse.media_store / directory, ignore_errors=True)
    hits_before = tier.stats().get_hits
    status, headers, body = http(
        "GET", f"{synapse.base}/_matrix/client/v1/media/download/{SERVER_NAME}/{media_id}",
        headers=auth)
    assert status == 200 and body == picture
    status, headers, body = http(
        "GET",
        f"{synapse.base}/_matrix/client/v1/media/thumbnail/{SERVER_NAME}/{media_id}"
        "?width=32&height=32&method=crop",
        headers=auth)
    assert status == 200 and body == thumb.body, headers
    assert tier.stats().get_hits >= hits_before + 2

    # The tier stops: Synapse still answers, at once, with what it has (here: nothing).
    service.stop()
    tier.close()
    for directory in ("local_content", "local_thumbnails"):
        shutil.rmtree(synapse.media_store / directory, ignore_errors=True)
    started = time.monotonic()
    status, _, _ = http(
        "GET", f"{synapse.base}/_matrix/client/v1/media/download/{SERVER_NAME}/{media_id}",
        headers=auth)
    assert status == 404
    assert time.monotonic() - started < 10
    # And uploads still work; the provider logs and counts the failed store.
    status, _, body = http("POST", f"{synapse.base}/_matrix/media/v3/upload?filename=b.png",
                           png(16), {**auth, "Content-Type": "image/png"})
    assert status == 200, body
    new_id = json.loads(body)["content_uri"].rsplit("/", 1)[1]
    status, _, body = http(
        "GET", f"{synapse.base}/_matrix/client/v1/media/download/{SERVER_NAME}/{new_id}",
        headers=auth)
    assert status == 200 and body == png(16)


def test_key_mapping():
    from synapse.media._base import FileInfo, ThumbnailInfo

    assert media_key("me.example", FileInfo(None, "AbC")) == Key("me.example", "AbC", "")
    remote = FileInfo("other.example:8448", "xyz")
    assert media_key("me.example", remote) == Key("other.example:8448", "xyz", "")
    thumb = ThumbnailInfo(width=320, height=240, method="scale", type="image/jpeg", length=10)
    assert media_key("me.example", FileInfo(None, "AbC", thumbnail=thumb)).variant == (
        "thumb/320x240/scale/image-jpeg")
    assert media_key("me.example", FileInfo(None, "AbC", url_cache=True)).variant == "preview"
    # Ids the tier's key rules refuse are not cached at all.
    assert media_key("me.example", FileInfo(None, "a b")) is None
    assert media_key("me.example", FileInfo("bad origin", "AbC")) is None
    # Synapse also tries a method-less name for remote thumbnails: the same object, not asked for
    # twice.
    remote_thumb = FileInfo("other.example", "xyzabc", thumbnail=thumb)
    assert not _legacy_thumbnail_path("remote_thumbnail/other.example/xy/za/bc/320-240-image-jpeg-scale", remote_thumb)
    assert _legacy_thumbnail_path("remote_thumbnail/other.example/xy/za/bc/320-240-image-jpeg", remote_thumb)


def test_config_is_checked_with_the_key_named(tmp_path):
    from synapse.config._base import ConfigError

    parsed = MediaCacheStorageProvider.parse_config({"address": "127.0.0.1:50051", "timeout": "2s"})
    assert parsed.timeout == 2.0
    for bad, key in [
        ({}, "address"),
        ({"address": "x:1", "tls_ca_file": str(tmp_path / "none")}, "tls_ca_file"),
        ({"address": "x:1", "token_file": str(tmp_path / "none")}, "token_file"),
        ({"address": "x:1", "tls_ca_file": __file__, "tls_cert_file": __file__}, "tls_key_file"),
        ({"address": "x:1", "tls_cert_file": __file__, "tls_key_file": __file__}, "tls_ca_file"),
        ({"address": "x:1", "timeout": "soon"}, "timeout"),
        ({"address": "x:1", "colour": "blue"}, "colour"),
        ({"address": "x:1", "threads": 0}, "threads"),
    ]:
        with pytest.raises(ConfigError) as err:
            MediaCacheStorageProvider.parse_config(bad)
        assert err.value.path == (key,), (bad, err.value.path)
    with pytest.raises(ConfigError, match="mapping"):
        MediaCacheStorageProvider.parse_config(["address"])
    assert MediaCacheStorageProvider.parse_config({"address": "x:1", "timeout": "1h"}).timeout == 3600
