"""Configuration from the environment (API.md lists the variables and their defaults)."""

from __future__ import annotations

from functools import lru_cache
from typing import Literal

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

SERVICE_PORTS = {
    "usage-meter": 8001,
    "wallet": 8002,
    "recharge": 8003,
    "rebilling": 8004,
    "notifier": 8005,
}


DEV_SECRET = "tally-dev-secret-change-me-in-production"


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="", extra="ignore", populate_by_name=True)

    kafka_bootstrap_servers: str = Field("127.0.0.1:9092", alias="KAFKA_BOOTSTRAP_SERVERS")
    # The embedded broker rejects idempotent producers; real Kafka clusters should turn it on.
    kafka_enable_idempotence: bool = Field(False, alias="KAFKA_ENABLE_IDEMPOTENCE")
    # Kafka over TLS and/or SASL (Strimzi: SASL_SSL with SCRAM-SHA-512, a KafkaUser per
    # service); PLAINTEXT is the embedded broker's. KAFKA_SSL_CAFILE: the cluster CA (PEM).
    kafka_security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = Field(
        "PLAINTEXT", alias="KAFKA_SECURITY_PROTOCOL"
    )
    kafka_sasl_mechanism: Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"] = Field(
        "SCRAM-SHA-512", alias="KAFKA_SASL_MECHANISM"
    )
    kafka_sasl_username: str | None = Field(None, alias="KAFKA_SASL_USERNAME")
    kafka_sasl_password: str | None = Field(None, alias="KAFKA_SASL_PASSWORD")
    kafka_ssl_cafile: str | None = Field(None, alias="KAFKA_SSL_CAFILE")
    kafka_max_batch: int = Field(8000, alias="KAFKA_MAX_BATCH", ge=1, le=100_000)
    # Compression of the record batches the outbox relays produce (consumers need a client
    # that reads it: every maintained Kafka client reads zstd, Kafka 2.1+).
    kafka_compression: Literal["none", "gzip", "snappy", "lz4", "zstd"] = Field(
        "zstd", alias="KAFKA_COMPRESSION"
    )
    # Consumer group liveness. Joins take about half the session timeout on the embedded broker,
    # so make run and the tests shorten it; keep Kafka's defaults in production.
    kafka_session_timeout_ms: int = Field(10_000, alias="KAFKA_SESSION_TIMEOUT_MS", ge=1000)
    kafka_heartbeat_interval_ms: int = Field(3_000, alias="KAFKA_HEARTBEAT_INTERVAL_MS", ge=100)
    # How long a fetch may wait for records. Kafka answers as soon as there is one record; the
    # embedded broker holds every fetch for about half of this, so Kafka's 500 ms default
    # would add ~250 ms to each hop of the money path. The money path's consumers (every usage
    # event) use the first; the others (state changes, settings, recharges) the second: each
    # idle fetch costs the embedded broker CPU, and twelve consumers polling every 50 ms took
    # half of it (docs/performance.md, round 4).
    kafka_fetch_max_wait_ms: int = Field(50, alias="KAFKA_FETCH_MAX_WAIT_MS", ge=1, le=10_000)
    kafka_side_fetch_max_wait_ms: int = Field(250, alias="KAFKA_SIDE_FETCH_MAX_WAIT_MS", ge=1, le=10_000)
    # usage-meter answers "duplicate" for an event id sent again within this many days; older
    # ids are forgotten (0: never). The ledger's own keys still charge a usage event once,
    # whenever it is re-sent (docs/0007).
    dedupe_window_days: int = Field(35, alias="TALLY_DEDUPE_WINDOW_DAYS", ge=0, le=36_500)
    # Allocations between young-generation garbage collections (Python's default: 700).
    gc_gen0_threshold: int = Field(50_000, alias="TALLY_GC_GEN0_THRESHOLD", ge=100)
    database_url: str | None = Field(None, alias="DATABASE_URL")
    db_pool_size: int = Field(8, alias="DB_POOL_SIZE", ge=1, le=200)
    # development: the development secret is accepted (make run and the tests set it);
    # production (the default): a service refuses to start with it unless a JWKS URL is set
    environment: Literal["development", "production"] = Field("production", alias="TALLY_ENV")
    jwt_secret: str = Field(DEV_SECRET, alias="TALLY_JWT_SECRET")
    # tokens of an identity provider: its JWKS (RS256/ES256), the iss and aud every token needs
    jwt_jwks_url: str | None = Field(None, alias="TALLY_JWT_JWKS_URL")
    jwt_issuer: str | None = Field(None, alias="TALLY_JWT_ISSUER")
    jwt_audience: str | None = Field(None, alias="TALLY_JWT_AUDIENCE")
    jwt_algorithms: str = Field("RS256,ES256", alias="TALLY_JWT_ALGORITHMS")
    jwt_jwks_refresh_seconds: float = Field(600, alias="TALLY_JWT_JWKS_REFRESH_SECONDS", gt=0)
    stripe_api_base: str = Field("http://127.0.0.1:8420", alias="STRIPE_API_BASE")
    stripe_api_key: str = Field("sk_test_tally", alias="STRIPE_API_KEY")
    stripe_webhook_secret: str = Field("whsec_tally_dev", alias="STRIPE_WEBHOOK_SECRET")
    smtp_url: str = Field("smtp://127.0.0.1:1025", alias="SMTP_URL")
    mail_from: str = Field("Tally <billing@tally.local>", alias="TALLY_MAIL_FROM")
    log_level: str = Field("INFO", alias="TALLY_LOG_LEVEL")
    outbox_poll_ms: int = Field(1000, alias="TALLY_OUTBOX_POLL_MS", ge=1, le=10_000)
    # Usage events per second per product token (0: unlimited), and the burst allowed.
    ingest_rate: int = Field(50_000, alias="TALLY_INGEST_RATE", ge=0)
    ingest_burst: int = Field(100_000, alias="TALLY_INGEST_BURST", ge=1)
    max_body_bytes: int = Field(2_000_000, alias="TALLY_MAX_BODY_BYTES", ge=1024)
    # Poison records of one kind a consumer group may dead-letter in a day, all replicas
    # together; one more parks the consumer (a broken release, not poison: docs/0014).
    poison_budget: int = Field(3, alias="TALLY_POISON_BUDGET", ge=0, le=10_000)
    # usage-meter: group commits of POST /v1/usage in flight at once (docs/0015).
    # Each group holds a pool connection (DB_POOL_SIZE) while it runs: keep it well below that.
    ingest_group_concurrency: int = Field(1, alias="TALLY_INGEST_GROUP_CONCURRENCY", ge=1, le=4)
    # usage-meter: at most one group commit of POST /v1/usage starts per this many ms; what
    # arrives meanwhile joins it (0: each starts as soon as the last one ends). A request
    # waits at most this long, and only under load (docs/0024).
    ingest_group_interval_ms: int = Field(10, alias="TALLY_INGEST_GROUP_INTERVAL_MS", ge=0, le=100)

    # Where the services find each other's public APIs (default: the service's port on host).
    wallet_url: str | None = Field(None, alias="TALLY_WALLET_URL")
    recharge_url: str | None = Field(None, alias="TALLY_RECHARGE_URL")
    rebilling_url: str | None = Field(None, alias="TALLY_REBILLING_URL")
    # recharge: waits between auto-recharge retries (seconds, comma-separated; empty: the
    # default policy), how long a charging run holds a wallet, and the wait after Stripe or the
    # wallet was unreachable.
    recharge_retry_seconds: str | None = Field(None, alias="TALLY_RECHARGE_RETRY_SECONDS")
    recharge_lease_seconds: int = Field(120, alias="TALLY_RECHARGE_LEASE_SECONDS", ge=1)
    recharge_unavailable_retry_seconds: int = Field(
        30, alias="TALLY_RECHARGE_UNAVAILABLE_RETRY_SECONDS", ge=1
    )
    # rebilling: the usage services a markup may name; the monthly price of one license (a
    # decimal string); the waits between a failed period charge's tries (hours); how often the
    # period runner wakes (seconds, 0: never).
    services: str = Field("email,sms,phone,ai,whatsapp", alias="TALLY_SERVICES")
    license_price: str = Field("10", alias="TALLY_LICENSE_PRICE")
    dunning_retry_hours: str = Field("24,72,120", alias="TALLY_DUNNING_RETRY_HOURS")
    period_run_seconds: float = Field(3600, alias="TALLY_PERIOD_RUN_SECONDS", ge=0)

    # notifier's outbound webhooks: private and loopback endpoints allowed (development and
    # tests only); the timeout of one delivery; the first wait after a failure (multiplied by
    # 4 each time, up to the cap) and how long a delivery is retried; how long an endpoint may
    # fail every delivery before it is disabled; deliveries in flight per endpoint and in all.
    webhook_allow_private: bool = Field(False, alias="TALLY_WEBHOOK_ALLOW_PRIVATE")
    webhook_timeout_seconds: float = Field(10, alias="TALLY_WEBHOOK_TIMEOUT_SECONDS", gt=0, le=60)
    webhook_retry_base_seconds: float = Field(5, alias="TALLY_WEBHOOK_RETRY_BASE_SECONDS", gt=0)
    webhook_retry_cap_seconds: float = Field(6 * 3600, alias="TALLY_WEBHOOK_RETRY_CAP_SECONDS", gt=0)
    webhook_retry_hours: float = Field(30, alias="TALLY_WEBHOOK_RETRY_HOURS", gt=0)
    webhook_disable_after_hours: float = Field(120, alias="TALLY_WEBHOOK_DISABLE_AFTER_HOURS", gt=0)
    webhook_endpoint_concurrency: int = Field(4, alias="TALLY_WEBHOOK_ENDPOINT_CONCURRENCY", ge=1, le=100)
    webhook_concurrency: int = Field(32, alias="TALLY_WEBHOOK_CONCURRENCY", ge=1, le=1000)

    port_usage_meter: int = Field(SERVICE_PORTS["usage-meter"], alias="TALLY_PORT_USAGE_METER")
    port_wallet: int = Field(SERVICE_PORTS["wallet"], alias="TALLY_PORT_WALLET")
    port_recharge: int = Field(SERVICE_PORTS["recharge"], alias="TALLY_PORT_RECHARGE")
    port_rebilling: int = Field(SERVICE_PORTS["rebilling"], alias="TALLY_PORT_REBILLING")
    port_notifier: int = Field(SERVICE_PORTS["notifier"], alias="TALLY_PORT_NOTIFIER")
    host: str = Field("127.0.0.1", alias="TALLY_HOST")

    def port_of(self, service: str) -> int:
        return int(getattr(self, "port_" + service.replace("-", "_")))

    def url_of(self, service: str) -> str:
        """The base URL of another service's public API."""
        configured = getattr(self, service.replace("-", "_") + "_url", None)
        return str(configured or f"http://{self.host}:{self.port_of(service)}").rstrip("/")

    def require_database_url(self) -> str:
        if not self.database_url:
            raise RuntimeError("DATABASE_URL is not set (make run / the test stack set it)")
        return self.database_url


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    return Settings()
