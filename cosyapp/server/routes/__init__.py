"""HTTP API surfaces, each a thin adapter over the one engine: `status` (/health, /model_info, /stats) and
`synthesize` (the seed's /synthesize). Each module exposes `routes`."""
