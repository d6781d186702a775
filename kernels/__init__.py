"""Kernel-shaped ops, one function each.

Every function here has a pure-torch reference body that runs on the CPU and
defines the op's semantics. Triton versions (GPU-performance work) drop in
behind the same signatures; callers never branch on the backend.
"""
