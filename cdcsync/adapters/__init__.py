"""I/O adapters: PostgreSQL, Kafka, Kafka Connect REST, Prometheus."""
