"""echoserver: a real-time WebSocket echo and broadcast server on Tornado."""

__version__ = "0.1.0"
