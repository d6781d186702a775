"""The model side of a worker: config parsing and loading, TP layers, the
Llama-family model, tokenizer and chat template, sampler, the per-rank
runner and worker, the scheduler<->worker step messages, and the random-
weight model maker.
"""
