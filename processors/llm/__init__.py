"""The async LLM engine behind a synchronous, once-per-shard API (design.md §5).

    from processors.llm import LLMClient, LLMRequest
    send = LLMClient.for_stage(ctx).endpoint("gpt4o").send    # once, when the batch function is built
    results = send(requests)                                  # same order; failures as ok=False

Importing this package does nothing else: no network, no files, no event loop.
"""

from processors.llm.client import EndpointCall, LLMClient, run_request_groups, run_requests
from processors.llm.errors import CircuitOpenError, MissingApiKeyError
from processors.llm.estimate import Projection, cost_usd, estimate_requests, project, request_tokens
from processors.llm.request import LLMRequest, LLMResult, Usage
from processors.llm.settings import BreakerSettings, EndpointSettings, LLMSettings, Price

__all__ = [
    "BreakerSettings", "CircuitOpenError", "EndpointCall", "EndpointSettings", "LLMClient", "LLMRequest", "LLMResult", "LLMSettings",
    "MissingApiKeyError", "Price", "Projection", "Usage", "cost_usd", "estimate_requests", "project",
    "request_tokens", "run_request_groups", "run_requests",
]
