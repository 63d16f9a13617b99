"""The HTTP service: app factory + lifespan (`app`), shared state, errors and the route modules."""

from cosyapp.server.app import configure_logging, create_app

__all__ = ["configure_logging", "create_app"]
