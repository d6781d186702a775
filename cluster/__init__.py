"""Wiring: the deployment spec, the launcher that starts a deployment's actors
on Ray, and the `ziggurat` CLI.
"""
