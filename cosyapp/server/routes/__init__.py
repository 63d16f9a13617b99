"""HTTP API surfaces, each a thin adapter over the engines (one per loaded backend): `status` (/health,
/model_info, /stats), `synthesize` (seed 004's /synthesize) and `fish_api` (seed 001's Fish Speech API: /v1/tts,
/v1/references/*, /v1/vqgan/*, the async tasks). Each module exposes `routes`."""
