"""cdcsync: move a live PostgreSQL database to another through Debezium and Kafka."""

__version__ = "0.1.0"
