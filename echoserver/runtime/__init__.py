"""Running the server: serving and draining, worker processes, the TLS context, logging,
signals, resource limits, and the front door that takes connections before Tornado does.

It is the top layer below cli: it may import every other package; nothing imports it
except cli.
"""
