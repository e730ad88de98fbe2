"""Tamper-evident audit logs: events, the hash-chained log, checkpoints, verification, export,
reconciliation and release records."""
