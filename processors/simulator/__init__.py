"""An OpenAI-compatible server that stands in for every LLM endpoint: tests, benchmarks, ``--dry-run``.

``server`` (the aiohttp app: chat completions, fault injection, a vLLM flavor, ``/_sim/stats``), ``batches``
(the Files and Batch API), ``core`` (options, counters, the deterministic completion), ``responders`` (what
answers a prompt), ``thread`` (in a background thread, or ``taskgalaxy simulate-api`` in the foreground).

It is a server, not part of the client (``processors.llm`` never imports it), and it knows no stage: its
caller hands it the responders (``processors.pipeline.default_responders()`` for the product's pipeline).
"""
