"""ziggurat: an LLM inference stack in which every layer is a Ray actor.

The offline API mirrors the one users know from vLLM::

    from ziggurat import LLM, SamplingParams
    llm = LLM(model_dir, tensor_parallel_size=1)
    outs = llm.generate(["Hello"], SamplingParams(max_tokens=32))

Exports are resolved lazily so that light modules (sampling params, the
scheduler, the CLI) import without pulling in torch.
"""

__version__ = "0.1.0"

_EXPORTS = {
    "LLM": "ziggurat.llm",
    "RequestOutput": "ziggurat.outputs",
    "CompletionOutput": "ziggurat.outputs",
    "SamplingParams": "ziggurat.sampling_params",
    "StructuredOutputsParams": "ziggurat.sampling_params",
    "LoRARequest": "ziggurat.sampling_params",
}


def __getattr__(name: str):
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'ziggurat' has no attribute {name!r}")


__all__ = list(_EXPORTS)
