"""The app's components are privlora's own: change nothing here to run a privlora config."""

from privlora.transports.flower.client_app import app as client_app
from privlora.transports.flower.server_app import app as server_app

__all__ = ["client_app", "server_app"]
