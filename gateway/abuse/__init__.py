"""Abuse detection (step 9): detectors raise signals, the ladder enforces."""
