"""One replica's engine, Ray-free: requests, paged KV with prefix caching,
continuous batching, the engine loop, the one validator and output
processor; plus the scheduler actor that runs it over Ray workers.
"""
