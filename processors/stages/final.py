"""Stage ``final`` (step 5, selection): keep a scored QA when its referee votes reach the threshold.

Kept samples leave in the LLaVA shape the paper released (``id, image, task_type, conversations``) plus the
keys that trace each one back (``qa_id``, ``image_id``) and its vote total; the rest fail with
``vote_below_threshold`` (or ``vote_missing`` under the ``fail`` policy of the score stage), naming the votes.
"""

from __future__ import annotations

from pydantic import Field

from builder.outputs import image_paths_by_id
from builder.rows import BatchOutput
from builder.stage import Stage, StageConfig

LLAVA_ID_CHARS = 16


class FinalConfig(StageConfig):
    threshold: int = Field(2, ge=0, description="keep a sample when its votes sum to at least this (paper: 2 of 3)")


def llava_id(qa_id: str) -> str:
    """Stable across reruns because ``qa_id`` is content-derived (image bytes, task type, question)."""
    return f"tg-{qa_id[:LLAVA_ID_CHARS]}"


def conversations(question: str, answer: str) -> list[dict[str, str]]:
    return [{"from": "human", "value": "<image>\n" + question}, {"from": "gpt", "value": answer}]


class FinalStage(Stage):
    name = "final"
    Config = FinalConfig
    key = "qa_id"
    upstream = "score"
    side_inputs = ("images",)
    batch_size = 512

    def input_key(self, config: FinalConfig) -> str:
        return "qa_id"

    def features(self, config: FinalConfig):
        import datasets

        string = datasets.Value("string")
        return datasets.Features(
            {
                "id": string,
                "image": string,
                "task_type": string,
                "conversations": datasets.List({"from": string, "value": string}),
                "qa_id": string,
                "image_id": string,
                "votes_total": datasets.Value("int32"),
            }
        )

    def make_batch_fn(self, config: FinalConfig, ctx):
        images = ctx.load_stage("images")
        path_of = image_paths_by_id(images)
        columns = list(self.features(config))

        def select(batch: dict[str, list]) -> dict[str, list]:
            out = BatchOutput(columns)
            for i, qa_id in enumerate(batch["qa_id"]):
                total, votes = batch["total"][i], batch["votes"][i]
                shown = ", ".join(f"{name}={vote}" for name, vote in votes.items())
                if total < config.threshold:
                    out.fail(qa_id, "vote_below_threshold", f"votes {total} < {config.threshold} ({shown})")
                    continue
                image_id = batch["image_id"][i]
                if image_id not in path_of:
                    out.fail(qa_id, "image_missing", f"image {image_id} is not in the images stage output")
                    continue
                out.add(qa_id, {
                    "id": llava_id(qa_id),
                    "image": path_of[image_id],
                    "task_type": batch["task_type"][i],
                    "conversations": conversations(batch["question"][i], batch["answer"][i]),
                    "qa_id": qa_id,
                    "image_id": image_id,
                    "votes_total": total,
                })
            return out.to_columns()

        return select
