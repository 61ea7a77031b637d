# The cdcsync daemon and CLI.
FROM python:3.11-slim
RUN apt-get update && apt-get install -y --no-install-recommends postgresql-client-15 \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /app
COPY pyproject.toml README.md ./
COPY cdcsync ./cdcsync
COPY connectors ./connectors
RUN pip install --no-cache-dir -e .
USER nobody
EXPOSE 9187
ENTRYPOINT []
CMD ["cdcsync", "run"]
