"""docker-compose.yml agrees with the project (it cannot run here: no Docker engine)."""

from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Any

import yaml

from cdcsync.config import ENV_VARS

REPO = Path(__file__).resolve().parents[2]
SERVICES = {
    "postgres-source",
    "postgres-target",
    "kafka",
    "kafka-connect",
    "cdcsync",
    "prometheus",
    "grafana",
}


def load() -> dict[str, Any]:
    doc: dict[str, Any] = yaml.safe_load((REPO / "docker-compose.yml").read_text())
    return doc


def pom_version(project: str, tag: str) -> str:
    text = (REPO / "connectors" / "jvm" / project / "pom.xml").read_text()
    match = re.search(rf"<{tag}>([^<]+)</{tag}>", text)
    assert match, f"{project}: no {tag}"
    return match.group(1)


def problems(doc: dict[str, Any], connect_dockerfile: str) -> list[str]:
    found: list[str] = []
    services = doc.get("services", {})
    missing = SERVICES - set(services)
    if missing:
        found.append(f"missing services {sorted(missing)}")
    for name in ("postgres-source", "postgres-target"):
        command = " ".join(services.get(name, {}).get("command", []))
        if "wal_level=logical" not in command:
            found.append(f"{name} does not run with wal_level=logical")
    env = services.get("cdcsync", {}).get("environment", {})
    unknown = sorted(k for k in env if k.startswith("CDCSYNC_") and k not in ENV_VARS)
    if unknown:
        found.append(f"cdcsync service uses unknown variables {unknown}")
    for key in (
        "CDCSYNC_SOURCE_DSN",
        "CDCSYNC_TARGET_DSN",
        "CDCSYNC_KAFKA_BOOTSTRAP",
        "CDCSYNC_CONNECT_URL",
    ):
        if key not in env:
            found.append(f"cdcsync service lacks {key}")
    for key, value in env.items():
        if "password=" in str(value).lower():
            found.append(f"{key} carries a password inline")
    kafka_version = pom_version("kafka", "kafka.version")
    image = services.get("kafka", {}).get("image", "")
    if not image.endswith(f":{kafka_version}"):
        found.append(f"kafka image {image} is not Kafka {kafka_version}")
    deps = re.findall(
        r"<version>([^<]+)</version>",
        (REPO / "connectors/jvm/debezium-postgres/pom.xml").read_text(),
    )
    debezium = deps[-1]  # the connector's; the first <version> is the POM's own
    if f"debezium.version={debezium}" not in connect_dockerfile:
        found.append(f"Dockerfile.connect does not pin Debezium {debezium}")
    if (
        f"kafka.version={kafka_version}" not in connect_dockerfile
        or f"apache/kafka:{kafka_version}" not in connect_dockerfile
    ):
        found.append(f"Dockerfile.connect is not built on Kafka {kafka_version}")
    metrics_port = str(env.get("CDCSYNC_METRICS_ADDR", ":")).rsplit(":", 1)[-1]
    prom = yaml.safe_load((REPO / "grafana/prometheus/prometheus.yml").read_text())
    targets = [
        t
        for job in prom["scrape_configs"]
        for sc in job.get("static_configs", [])
        for t in sc["targets"]
    ] + [
        f"{name}:{sd['port']}"
        for job in prom["scrape_configs"]
        for sd in job.get("dns_sd_configs", [])
        for name in sd["names"]
    ]
    if f"cdcsync:{metrics_port}" not in targets:
        found.append(f"prometheus does not scrape cdcsync:{metrics_port}")
    for volume in services.get("grafana", {}).get("volumes", []) + services.get(
        "prometheus", {}
    ).get("volumes", []):
        local = volume.split(":", 1)[0]
        if local.startswith("./") and not (REPO / local).exists():
            found.append(f"mounted path {local} does not exist")
    return found


def connect_dockerfile() -> str:
    return (REPO / "connectors" / "Dockerfile.connect").read_text()


def test_compose_agrees_with_the_project() -> None:
    assert problems(load(), connect_dockerfile()) == []


def test_checker_catches_disagreements() -> None:
    base = load()
    broken = copy.deepcopy(base)
    broken["services"]["kafka"]["image"] = "apache/kafka:3.9.0"
    del broken["services"]["grafana"]
    broken["services"]["cdcsync"]["environment"]["CDCSYNC_BOGUS"] = "x"
    broken["services"]["cdcsync"]["environment"]["CDCSYNC_TARGET_DSN"] = "host=t password=x"
    broken["services"]["postgres-source"]["command"] = ["postgres"]
    broken["services"]["cdcsync"]["environment"]["CDCSYNC_METRICS_ADDR"] = "0.0.0.0:1"
    found = " | ".join(problems(broken, connect_dockerfile().replace("3.5.0.Final", "3.4.0")))
    for expected in (
        "Kafka 4.1.1",
        "missing services",
        "CDCSYNC_BOGUS",
        "password inline",
        "postgres-source does not run",
        "Debezium",
        "cdcsync:1",
    ):
        assert expected in found, expected
