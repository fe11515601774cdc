"""Which service a base URL names: OpenAI's own API, Azure OpenAI, or another (self-hosted) server.

One reading of the host for every decision that rests on it: the latency signal's default and the padding
advice (``EndpointSettings.is_openai_host``), the breaker's advice, the referees' ``vote_constraint: auto``.
A request cache key names its server by the whole normalised URL instead (``prepare.endpoint_identity``), and
that stays as it is: changing it would change cache keys of runs users resume.
"""

from __future__ import annotations

from urllib.parse import urlsplit

OPENAI_HOST = "api.openai.com"
AZURE_OPENAI_SUFFIX = ".openai.azure.com"


def url_host(base_url: str) -> str:
    """The host of ``base_url`` in lower case, without user info, port or IPv6 brackets ("" when none).

    A URL written without a scheme ("gpu1:8000/v1") is read as if it had one."""
    text = base_url.strip()
    if "://" not in text:
        text = "//" + text
    try:
        return urlsplit(text).hostname or ""
    except ValueError:  # a malformed netloc (an unclosed IPv6 bracket): no host to name
        return ""


def is_openai_host(base_url: str) -> bool:
    """OpenAI's own API (``api.openai.com``), whatever the scheme, port or path."""
    return url_host(base_url) == OPENAI_HOST


def rejects_unknown_fields(base_url: str) -> bool:
    """OpenAI's API or an Azure OpenAI resource: services that refuse request fields they do not know
    (vLLM's ``structured_outputs``), where a vote is constrained with ``logit_bias`` instead."""
    host = url_host(base_url)
    return host == OPENAI_HOST or host.endswith(AZURE_OPENAI_SUFFIX)
