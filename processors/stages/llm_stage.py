"""``LLMStage``: what every stage that asks one LLM endpoint per row shares (filter, qa, taxonomy).

A new LLM stage is a prompt (with its version, in ``fingerprint_parts``), a request builder, a reply parser,
a ``run_batch`` and a simulator responder; its stage class subclasses ``LLMStage``, whose config has an
``endpoint`` field (a name in ``llm.endpoints``), and declares the figures of its cost estimate::

    class CaptionStage(LLMStage):
        name, Config, key, upstream = "caption", CaptionConfig, "image_id", "images"
        prompt_chars = 600          # one request's text, in characters
        reply_tokens = 80           # one reply, in tokens (the expected length, not max_tokens)
        images_per_request = 1

        def estimated_requests(self, config, run_config, assumptions):
            return assumptions.images

        def make_batch_fn(self, config, ctx):
            send = self.llm_call(config, ctx).send
            image_file = image_locator(ctx)
            return lambda batch: run_batch(batch, config, image_file=image_file, send=send).to_columns()

The base class supplies the rest: the whole shard in one call (``batch_size = None``), two shards in flight,
the endpoint in the fingerprint (``settings_parts``, with ``llm_endpoints`` for the key check), a request
the server did not answer asked again on the next run (``unanswered_reasons``), and the estimate.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar

from builder.stage import Stage
from processors.llm.request import UNANSWERED

if TYPE_CHECKING:
    from builder.stage import StageConfig, StageContext
    from processors.estimate import Assumptions
    from processors.llm.client import EndpointCall
    from processors.llm.estimate import Projection


class LLMStage(Stage):
    """A stage whose batch function calls the endpoint ``config.endpoint`` (see the module docstring)."""

    batch_size = None  # the whole shard crosses into the async engine at once
    unanswered_reasons = UNANSWERED  # an API failure is asked again on the next run, never sealed
    # The estimate's figures per request (``estimate``); a stage whose figures depend on its config
    # overrides ``estimated_prompt_chars`` / ``estimated_reply_tokens``.
    prompt_chars: ClassVar[int] = 0
    reply_tokens: ClassVar[int] = 0
    images_per_request: ClassVar[int] = 0

    def shards_in_flight(self, config: "StageConfig") -> int:
        return 2  # the next shard's requests fill the window while this one's last answers come back

    def llm_endpoints(self, config: "StageConfig") -> list[str]:
        return [config.endpoint]

    def resources(self, config: "StageConfig") -> dict:
        return llm_pool_resources()

    def settings_parts(self, config: "StageConfig", settings) -> dict:
        from processors.llm.settings import endpoint_parts

        return {"endpoint": endpoint_parts(settings, config.endpoint, key=f"stages.{self.name}.endpoint")}

    def llm_call(self, config: "StageConfig", ctx: "StageContext") -> "EndpointCall":
        """The stage's endpoint, resolved once (call it in ``make_batch_fn``): ``.send(requests)``."""
        from processors.llm.client import LLMClient

        return LLMClient.for_stage(ctx).endpoint(config.endpoint)

    def image_locator(self, ctx: "StageContext"):
        """``image_id -> Path`` over the images stage's rows (``processors.image_locator``)."""
        from processors.image_locator import image_locator

        return image_locator(ctx)

    def estimated_requests(self, config: "StageConfig", run_config, assumptions: "Assumptions") -> int:
        raise NotImplementedError(f"{type(self).__name__} declares no estimated_requests")

    def estimated_prompt_chars(self, config: "StageConfig", run_config) -> int:
        return self.prompt_chars

    def estimated_reply_tokens(self, config: "StageConfig") -> int:
        return self.reply_tokens

    def estimate(self, config: "StageConfig", run_config, assumptions: "Assumptions") -> "list[tuple[str, Projection]]":
        from processors.llm.estimate import project

        return [(self.name, project(run_config.llm, config.endpoint,
                                    requests=self.estimated_requests(config, run_config, assumptions),
                                    images_per_request=self.images_per_request,
                                    prompt_text_chars=self.estimated_prompt_chars(config, run_config),
                                    completion_tokens=self.estimated_reply_tokens(config)))]


def llm_pool_resources() -> dict:
    """On Ray: a pool of LLM workers (half a CPU each: they wait on the network) on the driver's node (the
    request cache is one SQLite file, safe within one host), each taking its share of the endpoints'
    concurrency (``processors.llm.accounts.WORKER_SHARE``) and leasing their rate from the run's budget actor."""
    from processors.llm.accounts import WORKER_SHARE

    return {"kind": "llm", "num_cpus": 0.5, "num_gpus": 0, "workers": None, "runtime_env": None,
            "driver_node": True, "limit_share": WORKER_SHARE}
