"""The Ray shell around one TP rank's worker (models/worker.py)."""
