"""The API surfaces, each a thin adapter between its wire format and the speech service (`../speech.py`):
`status` (/health, /model_info, /stats, /metrics), `synthesize` (seed 004's /synthesize), `openai_api`,
`flash_api`, `fish_api` (seed 001's Fish Speech API: /v1/tts, /v1/references/*, /v1/vqgan/*), `fish_async` (its
async tasks), `fish_live` (Fish's live WebSocket) and `agent` (seed 000's voice agent: /run and RunPod's job routes,
over cosyapp/agent). Each module exposes `routes`; none imports another."""
