"""Which replica serves a request: the policy (policy.py, prefix affinity
against load) and its actor.
"""
