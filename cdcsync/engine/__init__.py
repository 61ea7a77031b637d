"""The engine wires the core and the adapters into the phases of a migration."""
