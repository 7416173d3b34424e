"""pdserve: disaggregated prefill/decode LLM serving on Ray. Offline API: `LLM`, `SamplingParams`."""

from pdserve.protocol import SamplingParams

__all__ = ["LLM", "SamplingParams", "RequestOutput"]
__version__ = "0.1.0"


def __getattr__(name):  # import the engine (torch, transformers) only when it is used
    if name in ("LLM", "RequestOutput"):
        from pdserve import llm

        return getattr(llm, name)
    raise AttributeError(name)
