"""The simulator's Files and Batch API: upload JSONL, create a batch, watch it move through
validating -> in_progress -> finalizing -> completed over ``batch_duration_s``, download output/error files.

Outputs are computed once, when a batch is first seen completed, with the same deterministic replies as the
online endpoint; ``batch_fail_rate`` sends items to the error file instead.
"""

from __future__ import annotations

import json
import time
import uuid
from typing import Any

from aiohttp import web

from processors.simulator.core import completion

# fraction of batch_duration_s at which each state ends
_PHASES = (("validating", 0.15), ("in_progress", 0.6), ("finalizing", 1.0))


def _file_object(record: dict[str, Any]) -> dict[str, Any]:
    return {"id": record["id"], "object": "file", "bytes": len(record["data"]), "created_at": record["created_at"],
            "filename": record["filename"], "purpose": record["purpose"], "status": "processed"}


def _store(state: Any, data: bytes, filename: str, purpose: str) -> dict[str, Any]:
    record = {"id": f"file-{uuid.uuid4().hex[:24]}", "data": data, "filename": filename, "purpose": purpose,
              "created_at": int(time.time())}
    state.files[record["id"]] = record
    return record


def add_routes(app: web.Application, key: web.AppKey) -> None:
    async def upload(request: web.Request) -> web.Response:
        state = request.app[key]
        form = await request.post()
        upload_field = form.get("file")
        if upload_field is None or not hasattr(upload_field, "file"):
            return web.json_response({"error": {"message": "missing file", "type": "invalid_request_error"}},
                                     status=400)
        record = _store(state, upload_field.file.read(), upload_field.filename or "upload.jsonl",
                        str(form.get("purpose", "batch")))
        state.stats.files_uploaded += 1
        return web.json_response(_file_object(record))

    def file_or_404(request: web.Request) -> dict[str, Any]:
        record = request.app[key].files.get(request.match_info["file_id"])
        if record is None:
            raise web.HTTPNotFound(text=json.dumps({"error": {"message": "no such file",
                                                              "type": "invalid_request_error"}}),
                                   content_type="application/json")
        return record

    async def file_info(request: web.Request) -> web.Response:
        return web.json_response(_file_object(file_or_404(request)))

    async def file_content(request: web.Request) -> web.Response:
        return web.Response(body=file_or_404(request)["data"], content_type="application/octet-stream")

    async def create_batch(request: web.Request) -> web.Response:
        state = request.app[key]
        body = await request.json()
        if body.get("input_file_id") not in state.files:
            return web.json_response({"error": {"message": "input file not found", "type": "invalid_request_error"}},
                                     status=400)
        batch = {"id": f"batch_{uuid.uuid4().hex[:24]}", "object": "batch", "endpoint": body.get("endpoint"),
                 "errors": None, "input_file_id": body["input_file_id"],
                 "completion_window": body.get("completion_window", "24h"), "status": "validating",
                 "output_file_id": None, "error_file_id": None, "created_at": int(time.time()),
                 "metadata": body.get("metadata"), "request_counts": {"total": 0, "completed": 0, "failed": 0},
                 "_started": time.monotonic()}
        state.batches[batch["id"]] = batch
        state.stats.batches_created += 1
        return web.json_response(_public(batch))

    async def retrieve_batch(request: web.Request) -> web.Response:
        state = request.app[key]
        batch = state.batches.get(request.match_info["batch_id"])
        if batch is None:
            return web.json_response({"error": {"message": "no such batch", "type": "invalid_request_error"}},
                                     status=404)
        _advance(state, batch)
        return web.json_response(_public(batch))

    app.router.add_post("/v1/files", upload)
    app.router.add_get("/v1/files/{file_id}", file_info)
    app.router.add_get("/v1/files/{file_id}/content", file_content)
    app.router.add_post("/v1/batches", create_batch)
    app.router.add_get("/v1/batches/{batch_id}", retrieve_batch)


def _public(batch: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in batch.items() if not k.startswith("_")}


def _advance(state: Any, batch: dict[str, Any]) -> None:
    if batch["status"] == "completed":
        return
    elapsed = (time.monotonic() - batch["_started"]) / max(state.options.batch_duration_s, 1e-6)
    for status, end in _PHASES:
        if elapsed < end:
            batch["status"] = status
            return
    _complete(state, batch)


def _complete(state: Any, batch: dict[str, Any]) -> None:
    options = state.options
    lines = state.files[batch["input_file_id"]]["data"].decode("utf-8").splitlines()
    outputs, failures = [], []
    for line in filter(None, (l.strip() for l in lines)):
        item = json.loads(line)
        custom_id = item["custom_id"]
        state.stats.batch_items[custom_id] += 1
        request_id = f"req_{uuid.uuid4().hex[:16]}"
        if state.rng.random() < options.batch_fail_rate:
            error_body = {"error": {"message": "simulated batch item failure", "type": "server_error"}}
            failures.append({"id": f"batch_req_{uuid.uuid4().hex[:16]}", "custom_id": custom_id,
                             "response": {"status_code": 500, "request_id": request_id, "body": error_body},
                             "error": None})
            continue
        body = completion(item["body"], state.responders, options.seed)
        outputs.append({"id": f"batch_req_{uuid.uuid4().hex[:16]}", "custom_id": custom_id,
                        "response": {"status_code": 200, "request_id": request_id, "body": body}, "error": None})
    as_jsonl = lambda rows: "".join(json.dumps(r) + "\n" for r in rows).encode()  # noqa: E731
    batch["output_file_id"] = _store(state, as_jsonl(outputs), "output.jsonl", "batch_output")["id"]
    if failures:
        batch["error_file_id"] = _store(state, as_jsonl(failures), "errors.jsonl", "batch_output")["id"]
    batch["request_counts"] = {"total": len(outputs) + len(failures), "completed": len(outputs),
                               "failed": len(failures)}
    batch["status"] = "completed"
    batch["completed_at"] = int(time.time())
