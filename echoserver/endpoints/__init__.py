"""The endpoints: the WebSocket handlers (echo, broadcast, mixed mode), Server-Sent Events,
admission (the checks before a handshake), occupancy, the access log, and the base handler
every route uses.

They may import fanout, transport, brokers, wire and the leaves; never web or runtime.
"""
