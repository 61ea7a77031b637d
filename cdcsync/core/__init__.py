"""The pure core: no I/O, no clocks, no sockets. Adapters depend on it, never the reverse."""
