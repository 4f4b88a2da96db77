"""Albireo: an LLM inference and serving engine that keeps the serial part off the critical path."""

from albireo.entrypoints.llm import LLM
from albireo.outputs import CompletionOutput, RequestOutput
from albireo.sampling_params import SamplingParams

__all__ = ["LLM", "CompletionOutput", "RequestOutput", "SamplingParams"]
__version__ = "0.1.0"
