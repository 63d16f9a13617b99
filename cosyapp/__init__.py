"""cosyapp: a streaming text-to-speech appliance."""

__version__ = "0.1.0"
