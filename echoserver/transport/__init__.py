"""The connection's I/O: the WebSocket connection on the raw stream, the socket transport a
plain connection moves to (one epoll per loop), the stream writes, the flusher and
keepalive, and the Tornado seam (the one module touching Tornado's internals).

It may import wire and the leaves (config, metrics); never fanout, brokers or anything above.
It knows a broadcast only as wire.shared.SharedMessage, never the hub's Delivery.
"""
