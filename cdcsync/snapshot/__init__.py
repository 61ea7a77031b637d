"""Phase 3: the consistent initial snapshot."""
