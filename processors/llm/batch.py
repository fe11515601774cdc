"""Batch API mode: JSONL files within the API's limits, uploaded, submitted, polled, collected, mapped back.

Each item's ``custom_id`` is its cache key. The state of a call (uploaded file ids, batch ids) is written to
``<stage_dir>/llm_batches/<hash of the call's keys>.json`` after every upload and every submission, so a
process that dies while a batch runs finds its batches again on restart and polls them instead of paying
for them twice. Items a batch failed, or never answered (expired, cancelled, failed batch), are retried
online when ``batch_retry_failed_online`` is set, else recorded with reason ``batch_failed``.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tenacity import AsyncRetrying, retry_if_exception_type, stop_after_attempt, wait_random_exponential

from builder.runfolder import atomic_write_json, read_json
from processors.llm import reply as rp
from processors.llm.errors import AttemptError
from processors.llm.prepare import Prepared
from processors.llm.request import BATCH_FAILED, LLMResult, Usage
from processors.llm.transport import make_sdk_client

logger = logging.getLogger(__name__)

TERMINAL = ("completed", "failed", "expired", "cancelled")
STATE_FOLDER = "llm_batches"


def split_jsonl(lines: list[bytes], max_requests: int, max_bytes: int) -> list[bytes]:
    """Pack JSONL lines into files of at most ``max_requests`` lines and ``max_bytes`` bytes."""
    files, current, size = [], [], 0
    for line in lines:
        if len(line) > max_bytes:
            raise ValueError(f"one batch request is {len(line)} bytes, over the {max_bytes}-byte file limit")
        if current and (len(current) >= max_requests or size + len(line) > max_bytes):
            files.append(b"".join(current))
            current, size = [], 0
        current.append(line)
        size += len(line)
    if current:
        files.append(b"".join(current))
    return files


class BatchRunner:
    def __init__(self, ep: Any, connection: Any, online: Any, cache: Any, tally: Any, state_dir: Path):
        self.ep, self.connection, self.online = ep, connection, online
        self.cache, self.tally = cache, tally
        self.state_dir = Path(state_dir) / STATE_FOLDER
        self._client: Any = None

    async def _control(self, call: Any, *args: Any, **kwargs: Any) -> Any:
        """A files/batches call, retried on the transient errors the SDK reports (its own retries are off)."""
        import openai

        transient = (openai.APIConnectionError, openai.APITimeoutError, openai.RateLimitError,
                     openai.InternalServerError)
        retrying = AsyncRetrying(stop=stop_after_attempt(self.ep.max_retries + 1), reraise=True,
                                 wait=wait_random_exponential(multiplier=self.ep.backoff_initial_s,
                                                              max=self.ep.backoff_max_s),
                                 retry=retry_if_exception_type(transient))
        return await retrying(call, *args, **kwargs)

    async def run(self, todo: list[Prepared], call_id: str,
                  on_batches_read: Callable[[], None] = lambda: None) -> dict[str, LLMResult]:
        """``call_id`` names the state file: a hash of *all* the call's request keys, cached or not, so a
        restart after some answers reached the cache still finds the batches it submitted.
        ``on_batches_read``: called once every batch's replies are read back and billed, before the items it
        did not answer go online (the caller releases the call's spend-cap hold there: kept, it would count the
        answered items twice and the online retries' items twice, and stop a run far below its cap)."""
        state_path = self.state_dir / f"{call_id}.json"
        state = read_json(state_path) or {"parts": []}
        async with make_sdk_client(self.connection.base_url, self.connection.api_key, self.ep.timeout_s) as client:
            self._client = client
            if state["parts"]:
                logger.info("resuming %d batch(es) recorded in %s", len(state["parts"]), state_path)
            else:
                await self._upload(todo, state, state_path)
            await self._submit(state, state_path)
            await asyncio.gather(*(self._wait(part, state, state_path) for part in state["parts"]))
            replies = await self._download(state)
        results, failed = self._map_back(todo, replies, call_id)
        on_batches_read()
        if failed and self.ep.batch_retry_failed_online:
            logger.info("retrying %d request(s) the batch did not answer online", len(failed))
            results.update(await self.online.run([p for p, _, _ in failed], call_id))
            return results
        for p, reason, why in failed:
            self.tally.failed += 1
            results[p.cache_key] = LLMResult(key=p.request.key, ok=False, reason=reason, detail=why)
        unanswered = sum(1 for _, reason, _ in failed if reason == BATCH_FAILED)
        if unanswered:
            # Its batches are over: the next run of the same call must submit a new batch for what the cache
            # still lacks, not read these again (a row the batch did not answer is asked again: it is no verdict).
            retired = state_path.with_name(f"{state_path.stem}.done-{time.strftime('%Y%m%dT%H%M%S')}.json")
            state_path.replace(retired)
            logger.info("%d request(s) the batch did not answer (failed or expired): the next run submits them in "
                        "a new batch (what this one answered is in the request cache; its record: %s)",
                        unanswered, retired.name)
        return results

    async def _upload(self, todo: list[Prepared], state: dict, state_path: Path) -> None:
        lines = []
        for p in todo:
            item = {"custom_id": p.cache_key, "method": "POST", "url": "/v1/chat/completions", "body": await p.body()}
            lines.append((json.dumps(item, ensure_ascii=False) + "\n").encode("utf-8"))
        for index, data in enumerate(split_jsonl(lines, self.ep.batch_max_requests, self.ep.batch_max_bytes)):
            uploaded = await self._control(self._client.files.create, file=(f"batch-{index:04d}.jsonl", data),
                                           purpose="batch")
            state["parts"].append({"file_id": uploaded.id, "batch_id": None, "status": "uploaded",
                                   "requests": data.count(b"\n")})
            atomic_write_json(state_path, state)
            logger.info("uploaded batch file %d (%d requests, %d bytes) as %s", index, data.count(b"\n"),
                        len(data), uploaded.id)

    async def _submit(self, state: dict, state_path: Path) -> None:
        for part in state["parts"]:
            if part["batch_id"] is None:  # also a file uploaded just before a crash
                batch = await self._control(self._client.batches.create, input_file_id=part["file_id"],
                                            endpoint="/v1/chat/completions",
                                            completion_window=self.ep.batch_completion_window)
                part["batch_id"], part["status"] = batch.id, batch.status
                atomic_write_json(state_path, state)
                logger.info("batch %s: %s (submitted, %d requests)", batch.id, batch.status, part["requests"])

    async def _wait(self, part: dict, state: dict, state_path: Path) -> None:
        while part["status"] not in TERMINAL:
            batch = await self._control(self._client.batches.retrieve, part["batch_id"])
            if batch.status != part["status"]:
                counts = batch.request_counts
                done = f" ({counts.completed}/{counts.total} done, {counts.failed} failed)" if counts else ""
                logger.info("batch %s: %s%s", batch.id, batch.status, done)
                part["status"] = batch.status
            part["output_file_id"], part["error_file_id"] = batch.output_file_id, batch.error_file_id
            atomic_write_json(state_path, state)
            if part["status"] not in TERMINAL:
                await asyncio.sleep(self.ep.batch_poll_s)

    async def _download(self, state: dict) -> dict[str, dict]:
        """Output and error lines by custom_id."""
        lines: dict[str, dict] = {}
        for part in state["parts"]:
            for file_id in (part.get("error_file_id"), part.get("output_file_id")):  # outputs win over errors
                if file_id:
                    content = await self._control(self._client.files.content, file_id)
                    for line in content.text.splitlines():
                        if line.strip():
                            item = json.loads(line)
                            lines[item["custom_id"]] = item
        return lines

    def _map_back(self, todo: list[Prepared], items: dict[str, dict], call_id: str):
        results: dict[str, LLMResult] = {}
        failed: list[tuple[Prepared, str]] = []
        # Unusable items were billed (and noted) the first time this batch's output was read: a resume that
        # reads it again must not count them again.
        noted = self.cache.unusable(call_id, [p.cache_key for p in todo]) if self.cache is not None else {}
        for p in todo:
            item = items.get(p.cache_key)
            response = (item or {}).get("response") or {}
            if item is None or response.get("status_code") != 200:
                why = "not answered by the batch" if item is None else json.dumps(item.get("error") or response)[:300]
                failed.append((p, BATCH_FAILED, why))
                continue
            try:
                reply = rp.normalise(response["body"])
            except AttemptError as exc:  # no answer of the model: as unanswered as an expired item
                failed.append((p, BATCH_FAILED, f"{exc.reason}: {exc.detail}"))
                continue
            try:
                value = rp.interpret(reply, p.request)
            except AttemptError as exc:
                if p.cache_key not in noted:  # paid for, though unusable: counted once, and against its retries
                    if self.cache is not None:
                        self.cache.add_unusable(call_id, p.cache_key, (exc.reason, exc.raw_text or ""))
                    self.tally.billed(Usage(**reply["usage"]), batch=True)
                failed.append((p, exc.reason, f"{exc.detail} (a Batch API reply)"))  # the model's answer: a verdict
                continue
            if self.cache is not None:  # cached before counted, as online (engine.OnlineEngine._attempt)
                self.cache.put(p.cache_key, reply)
            self.tally.billed(Usage(**reply["usage"]), batch=True)
            results[p.cache_key] = LLMResult(key=p.request.key, ok=True, value=value, raw_text=reply["text"],
                                             usage=Usage(**reply["usage"]), logprobs=reply["logprobs"],
                                             finish_reason=reply["finish_reason"], attempts=1)
        return results, failed
