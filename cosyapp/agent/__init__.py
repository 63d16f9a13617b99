"""The voice agent: a chat model writes the answer, the speech service speaks it sentence by sentence as it is
written, and conversations remember their history and voice (`chat`, `embedded`, `turn`, `conversations`,
`jobs`). The HTTP adapter is `cosyapp/server/routes/agent.py`."""
