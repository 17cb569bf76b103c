"""Bearer tokens, TLS and mutual TLS, against a service configured for each."""

from __future__ import annotations

import datetime

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from mediacache_client import Client, Key, PermissionDenied, Unauthenticated, Unavailable

TOKEN = "python-client-token-0123456789"
READER = "python-reader-token-0123456789"


def test_tokens(cluster, tmp_path):
    (tmp_path / "token").write_text(TOKEN + "\n")
    (tmp_path / "reader").write_text(READER + "\n")
    service = cluster(
        extra=f"auth:\n  token_files: [{tmp_path / 'token'}]\n"
        f"  read_only_token_files: [{tmp_path / 'reader'}]\n"
    )
    key = Key("example.org", "secret")
    with Client(service.address) as anonymous:
        with pytest.raises(Unauthenticated):
            anonymous.get(key)
    with Client(service.address, token="wrong-token-0123456789") as wrong:
        with pytest.raises(Unauthenticated):
            wrong.put(key, b"x")
        # A fill with a token the tier refuses (rotated away, say) still answers, from the origin.
        assert wrong.get_or_fill(Key("example.org", "refused"), lambda: b"origin").body == b"origin"
    with Client(service.address, token_file=str(tmp_path / "token")) as writer:
        assert writer.put(key, b"guarded").stored
    with Client(service.address, token=READER) as reader:
        assert reader.get(key).body == b"guarded"
        with pytest.raises(PermissionDenied):
            reader.put(key, b"overwrite")
        # Nor may it give up anyone's fill lease.
        with pytest.raises(PermissionDenied):
            reader.release_lease(key, "someone-elses-token")


def _name(common: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common)])


def _cert(subject, issuer_name, issuer_key, public_key, *, ca=False, server=False):
    now = datetime.datetime.now(datetime.timezone.utc)
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer_name)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if server:
        # Only a name the address does not carry: a client must be told to expect it.
        builder = builder.add_extension(
            x509.SubjectAlternativeName([x509.DNSName("mediacache.test")]),
            critical=False,
        ).add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
    elif not ca:
        builder = builder.add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False
        )
    return builder.sign(issuer_key, hashes.SHA256())


def _write(tmp_path, name, cert, key):
    (tmp_path / f"{name}.crt").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (tmp_path / f"{name}.key").write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return str(tmp_path / f"{name}.crt"), str(tmp_path / f"{name}.key")


def test_tls_and_mutual_tls(cluster, tmp_path):
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = _cert(_name("test ca"), _name("test ca"), ca_key, ca_key.public_key(), ca=True)
    ca_file, _ = _write(tmp_path, "ca", ca, ca_key)
    server_key = ec.generate_private_key(ec.SECP256R1())
    server = _cert(_name("mediacache"), ca.subject, ca_key, server_key.public_key(), server=True)
    cert_file, key_file = _write(tmp_path, "server", server, server_key)
    client_key = ec.generate_private_key(ec.SECP256R1())
    client = _cert(_name("media-repo"), ca.subject, ca_key, client_key.public_key())
    client_cert, client_key_file = _write(tmp_path, "client", client, client_key)

    service = cluster(
        extra=f"tls:\n  cert_file: {cert_file}\n  key_file: {key_file}\n"
        f"  client_ca_file: {ca_file}\n"
    )
    key = Key("example.org", "over-tls")
    mutual = dict(
        tls_ca_file=ca_file,
        tls_cert_file=client_cert,
        tls_key_file=client_key_file,
        tls_server_name="mediacache.test",
    )
    with Client(service.address, **mutual) as c:
        assert c.put(key, b"encrypted").stored
        assert c.get(key).body == b"encrypted"
    # Each part is needed: the name the certificate carries, the client certificate, TLS.
    without_name = {k: v for k, v in mutual.items() if k != "tls_server_name"}
    without_certificate = dict(tls_ca_file=ca_file, tls_server_name="mediacache.test")
    for settings in (without_name, without_certificate, {}):
        with Client(service.address, timeout=3.0, **settings) as c:
            with pytest.raises(Unavailable):
                c.get(key)
