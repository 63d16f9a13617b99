"""The service on a Ray Serve cluster (`cosyapp serve --ray`): the same Starlette app, one per replica.

`replica_app.py` wraps a replica's app (its id on every answer, start-up complete only once warmed up; no Ray
import), `deployment.py` turns `[cluster]` into a Ray Serve deployment and runs it. Ray is the optional
`cluster` extra: nothing outside this package imports it.
"""
