"""A secured nats-server: user/password over TLS with a CA made here; wrong credentials fail clearly."""

from __future__ import annotations

import datetime as dt
import ipaddress
from pathlib import Path

import pytest
from support.bus import carries_an_event

from llamaduo.bus.connection import connect
from llamaduo.runtime.local_servers import NatsServer
from llamaduo.settings import Settings

PASSWORD = "s3cret-pa55-word"


def make_ca_and_cert(folder: Path) -> tuple[Path, Path, Path]:
    """A self-signed CA and a server certificate for 127.0.0.1 signed by it."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = dt.datetime.now(dt.UTC)

    def name(cn: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = (x509.CertificateBuilder().subject_name(name("llamaduo test CA")).issuer_name(name("llamaduo test CA"))
          .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
          .not_valid_before(now - dt.timedelta(minutes=1)).not_valid_after(now + dt.timedelta(days=1))
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
          .sign(ca_key, hashes.SHA256()))
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (x509.CertificateBuilder().subject_name(name("127.0.0.1")).issuer_name(ca.subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=1)).not_valid_after(now + dt.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
                                                        x509.DNSName("localhost")]), critical=False)
            .sign(ca_key, hashes.SHA256()))
    paths = folder / "ca.pem", folder / "server.pem", folder / "server-key.pem"
    paths[0].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    paths[1].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    paths[2].write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return paths


@pytest.fixture(scope="module")
def secured(tmp_path_factory: pytest.TempPathFactory):
    folder = tmp_path_factory.mktemp("secured")
    ca, cert, key = make_ca_and_cert(folder)
    server = NatsServer(folder / "nats", extra_args=["--user", "app", "--pass", PASSWORD, "--tls",
                                                      "--tlscert", str(cert), "--tlskey", str(key)]).start()
    yield server, ca
    server.stop()


async def test_user_password_over_tls_carries_events(secured, caplog) -> None:
    server, ca = secured
    settings = Settings(nats_url=f"tls://127.0.0.1:{server.port}", nats_user="app", nats_password=PASSWORD,
                        nats_tls_ca_file=ca)
    got = await carries_an_event(settings)
    assert got == [7]
    assert PASSWORD not in caplog.text and PASSWORD not in repr(settings)


async def test_wrong_password_fails_with_a_clear_message(secured) -> None:
    server, ca = secured
    settings = Settings(nats_url=f"tls://127.0.0.1:{server.port}", nats_user="app", nats_password="wrong-one",
                        nats_tls_ca_file=ca)
    with pytest.raises(ConnectionError) as err:
        await connect(settings)
    message = str(err.value)
    assert f"cannot connect to NATS at tls://127.0.0.1:{server.port}" in message
    assert "authorization" in message.lower()
    assert "wrong-one" not in message


async def test_tls_without_the_ca_is_refused(secured) -> None:
    server, _ = secured
    settings = Settings(nats_url=f"tls://127.0.0.1:{server.port}", nats_user="app", nats_password=PASSWORD)
    with pytest.raises(ConnectionError, match="cannot connect"):
        await connect(settings)
