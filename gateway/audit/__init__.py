"""The audit trail: one tamper-evident, private record per request."""
