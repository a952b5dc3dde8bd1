"""The web application: the route table put together (app), the page, health, metrics, the
channel and publish API (handlers), and the redacting log filter the app installs.

It may import endpoints and everything below them; never runtime or cli.
"""
