"""The HTTP front door: the OpenAI API (server.py, protocol.py), keys and
quotas (gatekeeper.py), the admin API, and the engine client that routes,
submits and streams tokens.
"""
