"""tierlm: a small, fast, deterministic LLM inference runtime."""

from tierlm.llm import LLM
from tierlm.outputs import CompletionOutput, RequestOutput
from tierlm.sampling_params import SamplingParams

__all__ = ["LLM", "CompletionOutput", "RequestOutput", "SamplingParams"]
__version__ = "0.1.0"
