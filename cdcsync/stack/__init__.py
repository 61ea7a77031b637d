"""The local stack: real PostgreSQL, Kafka and Kafka Connect as local processes.

Tests, the demo and the benchmarks run on it where no container engine exists.
"""
