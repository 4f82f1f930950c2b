"""Parley's entry points: the CLI and the local stack it can start."""
