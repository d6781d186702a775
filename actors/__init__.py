"""The layer actors, one package each: ingress/ (HTTP), router/, scheduler/
(the engine), worker/, meter/ (tenants and usage); each is plain-Python
logic plus a thin Ray `actor.py`.
"""
