"""tierlm: a small, fast, deterministic LLM inference runtime."""

import os

# MKL's GEMMs (PyTorch's CPU flash attention uses them on CPUs without bf16 matrix units)
# pick code paths by buffer alignment, so an attention item's last bits could depend on
# which thread's scratch buffer computed it, i.e. on the batch. Conditional numerical
# reproducibility (AUTO: this CPU's fastest path, made alignment-independent; no slower
# here) removes that. MKL reads it once, at its first call: it must be set before any
# GEMM runs, which importing tierlm first guarantees. A value the user set is kept.
os.environ.setdefault("MKL_CBWR", "AUTO")

from tierlm.llm import LLM
from tierlm.lora.registry import LoRARequest
from tierlm.outputs import CompletionOutput, EmbeddingOutput, EmbeddingRequestOutput, RequestOutput
from tierlm.sampling_params import SamplingParams

__all__ = ["LLM", "CompletionOutput", "EmbeddingOutput", "EmbeddingRequestOutput", "LoRARequest", "RequestOutput",
           "SamplingParams"]
__version__ = "0.1.0"
