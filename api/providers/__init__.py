"""Provider payload parsers and signature checks. Pure: no IO, no clock, stdlib only."""
