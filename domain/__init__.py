"""Parley's pure core: conversation lifecycle, close policy and closure intent (no IO, no clock)."""
