"""The plain-Python engine logic that the Ray actors wrap: requests, the KV
block manager with prefix caching, the scheduler and the engine loop. None of
it imports Ray or needs CUDA, so tests drive it directly."""
