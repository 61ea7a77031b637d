"""Before anything is created: are Kafka and Kafka Connect there, and is Debezium installed?

``cdcsync run`` asks this first, so a wrong bootstrap address or Connect URL fails with
one message naming the setting and the address — before a slot, a publication or a
state schema exists — instead of after the snapshot, with a traceback.
"""

from __future__ import annotations

import re

from cdcsync.adapters.connect_rest import ConnectClient
from cdcsync.config import Settings
from cdcsync.errors import PreconditionError

POSTGRES_CONNECTOR = "io.debezium.connector.postgresql.PostgresConnector"


def check_kafka(bootstrap: str, timeout: float = 10.0) -> None:
    from confluent_kafka import KafkaException
    from confluent_kafka.admin import AdminClient

    # log_level 0: the broker's failures are reported once, here, not per retry on stderr.
    admin = AdminClient({"bootstrap.servers": bootstrap, "log_level": 0})
    try:
        admin.list_topics(timeout=timeout)
    except KafkaException as exc:
        err = exc.args[0] if exc.args else exc
        reason = err.str() if hasattr(err, "str") else str(err)
        raise PreconditionError(
            f"Kafka at {bootstrap} (kafka_bootstrap, CDCSYNC_KAFKA_BOOTSTRAP) did not answer "
            f"within {timeout:.0f}s: {reason}"
        ) from None


def check_connect(url: str) -> None:
    if not url.startswith(("http://", "https://")):
        raise PreconditionError(
            f"Kafka Connect URL {url!r} (connect_url, CDCSYNC_CONNECT_URL) must start with "
            "http:// or https://"
        )
    shown = redact_url(url)
    try:
        plugins = ConnectClient(url).plugins()
    except PreconditionError as exc:
        raise PreconditionError(
            f"Kafka Connect at {shown} (connect_url, CDCSYNC_CONNECT_URL) unreachable: "
            f"{_reason(exc)}"
        ) from None
    except (ValueError, KeyError, TypeError):
        raise PreconditionError(
            f"{shown} (connect_url, CDCSYNC_CONNECT_URL) answered, but not as Kafka Connect's "
            "REST API does: check the host, port and path"
        ) from None
    if POSTGRES_CONNECTOR not in plugins:
        raise PreconditionError(
            f"Kafka Connect at {shown} (connect_url, CDCSYNC_CONNECT_URL) lists no Debezium "
            f"PostgreSQL connector plugin ({POSTGRES_CONNECTOR}): is this the Connect worker's "
            "REST URL, with Debezium on its plugin.path?"
        )


def redact_url(url: str) -> str:
    """``url`` without any user:password part."""
    return re.sub(r"(://)[^/@]*@", r"\1***@", url)


def _reason(exc: BaseException) -> str:
    """The innermost cause's text: the socket's complaint, without the client's wrapping."""
    cause: BaseException = exc
    while cause.__cause__ is not None:
        cause = cause.__cause__
    text = str(cause)
    found = re.search(
        r"\[Errno -?\d+\] [^'\")]+|Connection refused|timed out|Name or service not known", text
    )
    return found.group(0) if found else text.splitlines()[0][:300]


def check_services(settings: Settings) -> None:
    """Raise :class:`PreconditionError` naming the first of Kafka or Connect that fails."""
    check_kafka(settings.kafka_bootstrap)
    check_connect(settings.connect_url)
