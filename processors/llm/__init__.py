"""The async LLM engine behind a synchronous, once-per-shard API (design.md §5).

    from processors.llm import LLMRequest, run_requests
    results = run_requests(requests, endpoint="gpt4o", ctx=ctx)   # same order; failures as ok=False

Importing this package does nothing else: no network, no files, no event loop.
"""

from processors.llm.api import run_requests
from processors.llm.errors import CircuitOpenError, MissingApiKeyError
from processors.llm.estimate import Projection, cost_usd, estimate_requests, project, request_tokens
from processors.llm.request import LLMRequest, LLMResult, Usage
from processors.llm.settings import BreakerSettings, EndpointSettings, LLMSettings, Price

__all__ = [
    "BreakerSettings", "CircuitOpenError", "EndpointSettings", "LLMRequest", "LLMResult", "LLMSettings",
    "MissingApiKeyError", "Price", "Projection", "Usage", "cost_usd", "estimate_requests", "project",
    "request_tokens", "run_requests",
]
