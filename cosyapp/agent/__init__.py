"""The voice agent: a chat model writes the answer, the speech service speaks it sentence by sentence as it is
written, and conversations remember their history and voice (`chat`, `embedded`, `turn`, `conversations`,
`jobs`). The HTTP adapter is `cosyapp/server/routes/agent.py`."""

# The server imports the agent (routes/agent.py) and the agent builds on the server's modules: importing the
# server first, whichever module of the two packages is imported first, gives one import order without cycles.
import cosyapp.server  # noqa: E402,F401
