"""Client side: `http` (a small /synthesize client) and `player` (streaming PyAudio playback)."""
