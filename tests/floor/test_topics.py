"""The topic declarations (schemas/topics.py) against everything else that names a topic: the settings, the
worker's Faust app, and every topic list in deploy/ (Strimzi KafkaTopics, the k8s configmap, the compose job
that creates the topics, the Kafka ACLs). A topic added, renamed or re-keyed in one place fails here."""

from __future__ import annotations

import json
import re
import threading
import time
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import yaml

from synthwatch.schemas.topics import CHANGELOGS, INPUT_TOPICS, TOPICS, Sighting, default_partition
from synthwatch.settings import Settings
from tests.support import factories

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"


def _k8s(name: str) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all((K8S / name).read_text()) if d]


def _configmap() -> dict[str, str]:
    return next(d for d in _k8s("configmap.yaml") if d["kind"] == "ConfigMap")["data"]  # type: ignore[no-any-return]


def _deployed(configmap: dict[str, str]) -> Settings:
    """The settings a k8s worker runs with: app id, partitions and topic names from the configmap."""
    fields = {key.removeprefix("SYNTHWATCH_").lower(): value for key, value in configmap.items()}
    return Settings(**{name: fields[name] for name in ("app_id", "partitions", *(t.setting for t in TOPICS))})


def test_every_topic_setting_is_declared_with_its_default() -> None:
    settings = Settings()
    topic_fields = {name for name in Settings.model_fields if name.startswith("topic_")}
    assert topic_fields == {t.setting for t in TOPICS}, "declare each SYNTHWATCH_TOPIC_* in schemas/topics.py"
    for topic in TOPICS:
        assert Settings.model_fields[topic.setting].default == topic.default
    assert settings.all_topics == tuple(t.default for t in TOPICS)
    assert settings.input_topics == tuple(t.default for t in INPUT_TOPICS)
    assert len(set(settings.all_topics)) == len(TOPICS), "two topics with one name"
    renamed = Settings(topic_alerts="x.alerts", app_id="other")
    assert "x.alerts" in renamed.all_topics
    assert {c.name(renamed) for c in CHANGELOGS} == {f"other-{c.table}-changelog" for c in CHANGELOGS}


def test_the_worker_app_reads_the_declared_topics_and_tables(tmp_path: Path) -> None:
    """Built like a worker, without a broker: the topics its agents consume and the tables whose changelogs it
    writes are exactly the declared ones."""
    from synthwatch.stream_apps.app import WorkerContext, create_app
    from synthwatch.stream_apps.detect.intake import Intake
    from synthwatch.stream_apps.detect.novelty import NoveltyDetector
    from synthwatch.stream_apps.detect.region import DetectionConfig, RegionDetector

    settings = Settings(data_dir=tmp_path)
    config = DetectionConfig.from_settings(settings)
    ctx = WorkerContext(
        settings=settings,
        client=None,  # type: ignore[arg-type]  # not used while the app is only built
        sink=SimpleNamespace(lock=threading.Lock(), store_rejects=None, store_alerts=None),  # type: ignore[arg-type]
        intake=Intake(),
        regions=RegionDetector(config),
        novelty=NoveltyDetector(config.novelty),
        started_at=time.monotonic(),
    )
    app = create_app(ctx, "127.0.0.1:9", 6066)
    consumed = {name for agent in app.agents.values() for name in agent.channel.topics}
    assert consumed == {t.name(settings) for t in TOPICS}
    tables = {name: table.changelog_topic.get_topic_name() for name, table in app.tables.items()}
    assert tables == {c.table: c.name(settings) for c in CHANGELOGS}


def test_strimzi_topics_are_the_declared_ones() -> None:
    configmap = _configmap()
    settings = _deployed(configmap)
    documents = [d for d in _k8s("kafka-topics.yaml") if d["kind"] == "KafkaTopic"]
    specs = {d["spec"]["topicName"]: d["spec"] for d in documents}
    declared = {t.name(settings): t for t in TOPICS} | {c.name(settings): c for c in CHANGELOGS}
    assert set(specs) == set(declared)
    assert len(specs) == len(documents), "a topic declared twice"
    for name, spec in specs.items():
        assert spec["partitions"] == settings.partitions, f"{name}: every topic has SYNTHWATCH_PARTITIONS"
        assert spec["config"]["cleanup.policy"] == declared[name].cleanup_policy, name
    # each KafkaTopic's comment says what its records are keyed by, as declared
    text = (K8S / "kafka-topics.yaml").read_text()
    for topic in TOPICS:
        block = text[: text.index(f"topicName: {topic.name(settings)}\n")].rsplit("---", 1)[1]
        assert f"keyed by {topic.key}" in block.lower(), f"{topic.name(settings)}: keyed by {topic.key}"


def test_configmap_names_each_declared_topic() -> None:
    configmap = _configmap()
    named = {key: value for key, value in configmap.items() if key.startswith("SYNTHWATCH_TOPIC_")}
    assert named == {f"SYNTHWATCH_{t.setting.upper()}": t.default for t in TOPICS}


def test_compose_creates_the_declared_topics_co_partitioned() -> None:
    compose = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    script = compose["services"]["kafka-topics"]["command"][0]
    listed = re.search(r"for topic in ([^;]+);", script)
    assert listed is not None
    assert listed.group(1).split() == [t.default for t in TOPICS]
    # the changelogs are left to Faust there (auto-created with the app's partition count)
    assert compose["services"]["kafka"]["environment"]["KAFKA_AUTO_CREATE_TOPICS_ENABLE"] == "true"
    partitions = re.search(r'--partitions "(\$\{KAFKA_PARTITIONS[^}]*\})"', script)
    assert partitions is not None
    assert compose["x-synthwatch-env"]["SYNTHWATCH_PARTITIONS"] == partitions.group(1)


def test_acls_name_only_declared_topics() -> None:
    settings = _deployed(_configmap())
    declared = {t.name(settings) for t in TOPICS}
    users = [d for d in _k8s("kafka-users.yaml") if d["kind"] == "KafkaUser"]
    literal = {
        acl["resource"]["name"]
        for user in users
        for acl in user["spec"]["authorization"]["acls"]
        if acl["resource"]["type"] == "topic" and acl["resource"].get("patternType", "literal") == "literal"
    }
    assert literal and literal <= declared
    script = (DEPLOY / "kafka" / "acls.sh").read_text()
    named = set(re.findall(r"--topic (synthwatch\.[\w.-]+)", script))
    named |= {word for line in re.findall(r"for topic in ([^;]+);", script) for word in line.split()}
    assert named and named <= declared


def test_default_partition_is_the_kafka_clients_partitioner() -> None:
    """The worker puts a region's state where the publishers' records for that region go: default_partition
    (kafka-python's murmur2) must agree with the worker's client, aiokafka, which has its own implementation."""
    from aiokafka.partitioner import DefaultPartitioner

    for n in (1, 4, 12):
        partitions = list(range(n))
        for key in (b"FR-75", b"ML-BKO", b"", "région-é".encode(), bytes(range(256)), b"x" * 1001):
            assert default_partition(key, n) == DefaultPartitioner.__call__(key, partitions, partitions)
    assert default_partition(b"FR-75", 1) == 0


def test_a_sighting_survives_the_sightings_topic() -> None:
    sighting = factories.sighting(
        event_id="e1",
        occurred_at=datetime(2026, 3, 1, 12, 30, tzinfo=UTC),
        day=20513,
        region="FR-75",
        key="ABCDEFGHIJKLMN",
        name="x",
        family="cathinone",
        late_by_hours=3.5,
        reporter="lab-fr",
    )
    data = sighting.to_dict()
    assert data["occurred_at"] == "2026-03-01T12:30:00+00:00"
    assert Sighting.from_dict(data) == sighting
    assert "formerly" not in data, "written only by the report that ties a name to a structure"
    assert not {"formerly_regions", "formerly_since"} & set(data), "left out when unset"
    tied = replace(sighting, formerly="name:x", formerly_regions=["FR-75"], formerly_since="2026-02-01")
    assert Sighting.from_dict(json.loads(json.dumps(tied.to_dict()))) == tied
    # a newer producer's field (rolling upgrade) is ignored, not a reason to refuse the record and its batch
    assert Sighting.from_dict({**data, "field_of_a_later_version": 1}) == sighting
    assert sighting.reported_by == ["lab-fr"]
