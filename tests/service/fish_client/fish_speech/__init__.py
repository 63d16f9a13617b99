"""Test stand-in for the client-side `fish_speech` imports of seed 001's examples (see ../README.md)."""
