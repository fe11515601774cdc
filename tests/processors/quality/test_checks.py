"""The checks on top of the paper's protocol: answer and text-only referees, decontamination; each counts
how many protocol-kept samples it rejects, and a rejected sample fails with its reason."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

from PIL import Image, ImageDraw

from processors.clip.config import ClipMatchConfig
from processors.quality.decontam import QuestionIndex, _image_matches
from processors.quality.decontam_config import DecontaminationConfig
from processors.quality.plan import plan_final
from processors.stages.final import FinalConfig

ROWS = {
    "qa_id": ["q1", "q2", "q3", "q4"],
    "image_id": ["i1", "i1", "i2", "i3"],
    "task_type": ["A~x", "A~y", "B~z", "B~z"],
    "question": ["What colour is the car?", "How many dogs?", "What is 2 + 2?", "Which sign is red?"],
    "votes": [{"r1": 1, "r2": 1, "ans": 1, "blind": 0}, {"r1": 1, "r2": 1, "ans": 0, "blind": 0},
              {"r1": 1, "r2": 1, "ans": 1, "blind": 1}, {"r1": 0, "r2": 1, "ans": 1, "blind": 0}],
    "p_yes": [{"r1": 0.9, "r2": 0.8, "ans": 0.9, "blind": 0.1}] * 4,
}


def test_answer_and_blind_referees_gate_apart_from_the_threshold():
    config = FinalConfig(threshold=2, answer_referees=["ans"], blind_referees=["blind"])
    plan = plan_final(config, ROWS, known_images={"i1", "i2", "i3"})
    assert plan.failures["q2"][0] == "answer_incorrect"
    assert plan.failures["q3"][0] == "answerable_without_image"  # the planted text-only question
    assert plan.failures["q4"][0] == "vote_below_threshold"  # the answer/blind votes do not count toward 2
    assert "q1" not in plan.failures and plan.protocol_total["q1"] == 2
    assert plan.summary["protocol_kept"] == 3 and plan.summary["kept"] == 1
    assert plan.summary["rejected_by_check"]["answer_incorrect"] == 1
    assert plan.summary["rejected_by_check"]["answerable_without_image"] == 1
    # the paper's protocol (no extra referees named): the same votes keep q1-q3... and the extra votes count
    paper = plan_final(FinalConfig(threshold=2), ROWS, known_images={"i1", "i2", "i3"})
    assert set(paper.failures) == set()


def test_question_ngram_overlap():
    index = QuestionIndex(["In the figure above, what is the value of the angle marked x in degrees exactly?",
                           "Short one?"], n=13)
    long_q = "Look closely: in the figure above, what is the value of the angle marked x in degrees exactly, please?"
    assert index.hit(long_q) is not None
    assert index.hit("What is the value of the angle in this picture?") is None
    assert index.hit("short ONE") is not None  # shorter than n: the whole question must match


def test_a_planted_benchmark_image_is_found_exact_and_resized(tmp_path):
    bench, run = tmp_path / "bench", tmp_path / "run"
    bench.mkdir(), run.mkdir()
    planted = Image.new("RGB", (96, 72), (30, 60, 200))
    ImageDraw.Draw(planted).ellipse([10, 10, 60, 50], fill=(250, 220, 0))
    planted.save(bench / "mmbench_0001.png")
    planted.save(run / "exact.jpg", quality=100)  # re-encoded: not byte-equal; pixels nearly equal
    planted.save(run / "exact.png")  # same pixels
    planted.resize((192, 144)).save(run / "resized.png")
    other = Image.new("RGB", (96, 72), (0, 0, 0))
    ImageDraw.Draw(other).rectangle([0, 0, 40, 72], fill=(255, 255, 255))
    other.save(run / "other.png")
    images = {name: run / f"{name}.png" for name in ("exact", "resized", "other")}
    ctx = SimpleNamespace(settings=SimpleNamespace(stages=SimpleNamespace(match=ClipMatchConfig(
        model="tg-tiny-clip", pretrained=None, device="cpu", num_workers=0, batch_size=4))),
        cache_dir=tmp_path / "cache", stage_dir=tmp_path / "final")
    found = _image_matches(images, [("MMBench", bench / "mmbench_0001.png")],
                           DecontaminationConfig(near_threshold=0.995), ctx)  # random weights: cosines bunch up
    assert found["exact"].startswith("same pixels as MMBench")
    assert "near copy" in found["resized"]
    assert "other" not in found


def test_the_blind_referee_sends_no_image_and_flags_a_planted_text_only_question():
    import random

    from processors.referees.blind import BlindReferee
    from processors.referees.protocol import RefereeItem
    from processors.referees.settings import RefereeSettings
    from processors.referees.simulate import respond

    settings = RefereeSettings(name="blind", preset="internvl2-26b", blind=True, see_answer=True)
    referee = BlindReferee(settings, ctx=None)
    planted = RefereeItem("q", "/img.png", "Math~Arithmetic", "What is 17 + 25?", "The answer is 42.")
    visual = RefereeItem("v", "/img.png", "Counting~Dogs", "How many dogs are on the sofa?", "Three.")
    request = referee._request(planted, "structured_outputs")
    parts = [part for message in request.messages for part in message["content"]]
    assert all(part["type"] == "text" for part in parts)  # the image never travels
    assert "What is 17 + 25?" in parts[-1]["text"] and "42" in parts[-1]["text"]
    rng = random.Random(0)
    assert respond(request.messages, rng) == "1"  # the simulated text-only model does the sum
    votes = [respond(referee._request(visual, "structured_outputs").messages, random.Random(s)) for s in range(50)]
    assert votes.count("1") < 15  # most questions need the image
