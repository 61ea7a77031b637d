"""The command line: formats output and sends requests; the logic lives elsewhere."""
