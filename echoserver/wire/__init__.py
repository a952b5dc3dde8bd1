"""The wire: RFC 6455 framing, RFC 7692 compression, the handshake's rules, the host policy
and mixed mode's JSON envelopes, sans-I/O.

It turns bytes into frames and events and back, and decides what a handshake may do; it
never reads a socket. It imports nothing from the rest of the package, and neither tornado
nor asyncio (the import contract in setup.cfg checks both, through everything it imports).
"""
