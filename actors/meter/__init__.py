"""The tenant plane: tenants and keys, quotas, the usage ledger over SQLite or
PostgreSQL, and the meter actor that records usage events exactly once.
"""
