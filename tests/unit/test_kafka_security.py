"""Kafka over TLS and SASL: the settings reach every client Tally builds — the relay's producer,
the FastStream broker (its consumers and publishers) and the command line's clients. (Not run
against a SASL broker here: the embedded one is plaintext; see docs/operations.md.)"""

from __future__ import annotations

import datetime
import ssl
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from faststream.security import SASLScram256, SASLScram512

from tally.kafka import broker_security, client_security, make_broker, make_producer
from tally.settings import Settings


def ca_file(tmp_path: Path) -> str:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "cluster-ca")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(now)
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    path = tmp_path / "ca.crt"
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return str(path)


def test_plaintext_is_the_default() -> None:
    settings = Settings()
    assert client_security(settings) == {"security_protocol": "PLAINTEXT"}
    assert broker_security(settings) is None


async def test_sasl_ssl_with_scram_reaches_every_client(tmp_path: Path) -> None:
    settings = Settings(
        KAFKA_SECURITY_PROTOCOL="SASL_SSL",
        KAFKA_SASL_MECHANISM="SCRAM-SHA-512",
        KAFKA_SASL_USERNAME="tally-wallet",
        KAFKA_SASL_PASSWORD="s3cret",
        KAFKA_SSL_CAFILE=ca_file(tmp_path),
    )
    opts = client_security(settings)
    assert opts["security_protocol"] == "SASL_SSL" and opts["sasl_mechanism"] == "SCRAM-SHA-512"
    assert (opts["sasl_plain_username"], opts["sasl_plain_password"]) == ("tally-wallet", "s3cret")
    context = opts["ssl_context"]
    assert isinstance(context, ssl.SSLContext) and context.verify_mode == ssl.CERT_REQUIRED
    assert [c["subject"] for c in context.get_ca_certs()] == [((("commonName", "cluster-ca"),),)]
    security = broker_security(settings)
    assert isinstance(security, SASLScram512) and security.use_ssl
    producer = make_producer(settings, client_id="wallet")
    assert producer.client._security_protocol == "SASL_SSL"
    assert producer.client._sasl_plain_username == "tally-wallet"
    # the consumers FastStream builds for the broker's subscribers
    builder: Any = make_broker(settings, client_id="wallet").config.broker_config.builder
    built = builder.keywords
    assert built["security_protocol"] == "SASL_SSL" and built["sasl_mechanism"] == "SCRAM-SHA-512"
    assert (built["sasl_plain_username"], built["sasl_plain_password"]) == ("tally-wallet", "s3cret")
    assert isinstance(built["ssl_context"], ssl.SSLContext)


def test_scram_256_and_tls_only(tmp_path: Path) -> None:
    scram = Settings(
        KAFKA_SECURITY_PROTOCOL="SASL_PLAINTEXT",
        KAFKA_SASL_MECHANISM="SCRAM-SHA-256",
        KAFKA_SASL_USERNAME="u",
        KAFKA_SASL_PASSWORD="p",
    )
    security = broker_security(scram)
    assert isinstance(security, SASLScram256) and not security.use_ssl
    assert "ssl_context" not in client_security(scram)
    tls = Settings(KAFKA_SECURITY_PROTOCOL="SSL", KAFKA_SSL_CAFILE=ca_file(tmp_path))
    assert client_security(tls)["security_protocol"] == "SSL" and "sasl_mechanism" not in client_security(tls)


def test_sasl_without_credentials_is_refused_at_start() -> None:
    with pytest.raises(ValueError, match="KAFKA_SASL_USERNAME"):
        client_security(Settings(KAFKA_SECURITY_PROTOCOL="SASL_SSL"))
    with pytest.raises(ValueError):
        Settings(KAFKA_SECURITY_PROTOCOL="SASL_SSL_PLEASE")
