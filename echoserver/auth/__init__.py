"""Who a client is and what it may do: connection tokens (JWT), namespaces and their
rights, personal channels, the expiry of a connection's token, and each user's connections.

identity.py is what a verified token says; verifier.py checks a token (PyJWT) against the
configured secrets, public keys and JWKS (jwks.py fetches a remote one); rights.py compiles
[[namespaces]] and answers "may this identity join / publish on this channel"; expiry.py
closes connections whose token ran out; users.py finds a user's connections. authority.py
bundles them for the server. No Tornado here: the endpoints call in.
"""
