"""The checks on top of the paper's protocol: answer and text-only referees, decontamination; each counts
how many protocol-kept samples it rejects, and a rejected sample fails with its reason."""

from __future__ import annotations

from pathlib import Path

import pytest
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
    # a blind referee's p_yes is its answer's agreement with the sample's (1.0: the same answer)
    "p_yes": [{"r1": 0.9, "r2": 0.8, "ans": 0.9, "blind": b} for b in (0.1, 0.0, 1.0, 0.0)],
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
                           "Which of these shapes has exactly four equal sides and four right angles?"], n=13)
    long_q = "Look closely: in the figure above, what is the value of the angle marked x in degrees exactly, please?"
    assert index.hit(long_q) is not None
    assert index.hit("What is the value of the angle in this picture?") is None
    # shorter than n: the whole question must match, and have at least min_exact (8) words
    assert index.hit("which of these SHAPES has exactly four equal sides and four right angles") is not None


def test_generic_short_templates_are_no_benchmark_questions():
    index = QuestionIndex(["What is shown in the image?", "Describe this image."], n=13)
    assert index.hit("What is shown in the image?") is None  # 6 words: a template, not evidence
    assert index.hit("What is shown in the image") is None


def test_a_benchmark_line_without_a_question_flags_nothing(tmp_path):
    from processors.quality.decontam import read_questions

    path = tmp_path / "bench.jsonl"
    path.write_text('{"answer": "B"}\n{"question": ""}\n{"question": "   "}\n\n'
                    '{"question": "How many apples are left after Tom eats two of the five apples on the table?"}\n',
                    encoding="utf-8")
    questions = read_questions(path)
    assert len(questions) == 1
    index = QuestionIndex(questions, n=13)
    assert index.hit("???") is None and index.hit("これは何ですか") is None  # no ASCII word: not flagged now
    assert index.hit("") is None


def test_questions_are_tokenized_as_unicode_words():
    from processors.quality.decontam import words

    assert words("Was zeigt die Größe? ÉTÉ!") == ["was", "zeigt", "die", "grösse", "été"]
    bench = "Welche Straße führt über die Brücke zum Bahnhof in der Mitte der Stadt Köln heute?"
    index = QuestionIndex([bench], n=13)
    assert index.hit("Sag mir: welche straße führt über die brücke zum bahnhof in der mitte der stadt köln heute?")
    # the ASCII-only tokenizer read "straße" as "stra", "e": a different question shared that 13-gram
    assert index.hit("Welche Strand führt über die Bruecke zum Bahnhof in der Mitte der Stadt Koln heute?") is None


def _png_claiming(width: int, height: int) -> bytes:
    """A PNG whose header announces width x height pixels (a decompression bomb's header) and no pixels."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")


def test_a_planted_benchmark_image_is_found_exact_rotated_and_resized(tmp_path):
    bench, run = tmp_path / "bench", tmp_path / "run"
    bench.mkdir(), run.mkdir()
    planted = Image.new("RGB", (96, 72), (30, 60, 200))
    ImageDraw.Draw(planted).ellipse([10, 10, 60, 50], fill=(250, 220, 0))
    planted.save(bench / "mmbench_0001.png")
    (bench / "bomb.png").write_bytes(_png_claiming(100_000, 100_000))  # skipped with a warning, no crash
    (bench / "broken.png").write_bytes(b"\x89PNG not really")
    planted.save(run / "exact.png")  # same pixels, another file
    planted.save(run / "exact.jpg", quality=95)  # lossy re-encoding: other pixels, so a near copy at best
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    planted.transpose(Image.Transpose.ROTATE_90).save(run / "rotated.png", exif=exif)
    planted.resize((192, 144)).save(run / "resized.png")
    other = Image.new("RGB", (96, 72), (0, 0, 0))
    ImageDraw.Draw(other).rectangle([0, 0, 40, 72], fill=(255, 255, 255))
    other.save(run / "other.png")
    images = {"exact": run / "exact.png", "jpeg": run / "exact.jpg", "rotated": run / "rotated.png",
              "resized": run / "resized.png", "other": run / "other.png"}
    ctx = SimpleNamespace(settings=SimpleNamespace(stages=SimpleNamespace(match=ClipMatchConfig(
        model="tg-tiny-clip", pretrained=None, device="cpu", num_workers=0, batch_size=4))),
        cache_dir=tmp_path / "cache", stage_dir=tmp_path / "final", run_dir=tmp_path / "run")
    bench_list = [("MMBench", p) for p in sorted(bench.iterdir())]
    found = _image_matches(images, bench_list, DecontaminationConfig(near_threshold=0.995), ctx)  # random
    # weights: the cosines bunch up, hence the high threshold
    assert found["exact"].startswith("same pixels as MMBench: mmbench_0001.png")
    assert found["rotated"].startswith("same pixels as MMBench")  # EXIF orientation applied before hashing
    assert "near copy" in found["jpeg"]  # the JPEG is not a pixel match; the CLIP near match finds it
    assert "near copy" in found["resized"]
    assert "other" not in found
    exact_only = _image_matches(images, bench_list, DecontaminationConfig(near_threshold=None), ctx)
    assert set(exact_only) == {"exact", "rotated"}


def test_the_match_stages_vectors_are_reused(tmp_path):
    import json

    import numpy as np

    from processors.clip.coverage import embed_images
    from processors.quality.decontam_clip import _our_vectors
    from processors.clip.shared import get_matcher

    run = tmp_path / "run"
    (run / "02_match" / "coverage").mkdir(parents=True)
    match = ClipMatchConfig(model="tg-tiny-clip", pretrained=None, device="cpu", num_workers=0, batch_size=4)
    (run / "02_match" / "state.json").write_text(json.dumps({"stage": "match", "fingerprint": "f", "shards_total": 0,
                                                             "config": match.model_dump(mode="json")}))
    for name, colour in (("a", (200, 0, 0)), ("b", (0, 200, 0))):
        Image.new("RGB", (64, 48), colour).save(tmp_path / f"{name}.png")
    saved = np.zeros((1, 32), dtype=np.float32)  # tg-tiny-clip's width
    saved[0, 0] = 1.0
    with open(run / "02_match" / "coverage" / "embeddings.npz", "wb") as handle:
        np.savez(handle, ids=np.array(["a"]), vectors=saved, error_pos=np.zeros(0, dtype=np.int64),
                 error_reason=np.array([], dtype=str), error_detail=np.array([], dtype=str))
    ctx = SimpleNamespace(run_dir=run, settings=SimpleNamespace(stages=SimpleNamespace(match=match)))
    matcher = get_matcher(match, tmp_path / "cache")
    images = {"a": tmp_path / "a.png", "b": tmp_path / "b.png"}
    vectors, bad = _our_vectors(matcher, ["a", "b"], images, ctx, tmp_path / "decontam")
    assert not bad
    assert np.array_equal(vectors[0], saved[0])  # a's vector is the match stage's, not embedded again
    fresh, _ = embed_images(matcher, ["b"], [images["b"]], tmp_path / "other.npz")
    assert np.allclose(vectors[1], fresh[0])  # only b was embedded here
    assert not (tmp_path / "decontam" / "images.npz").exists() or \
        list(np.load(tmp_path / "decontam" / "images.npz")["ids"]) == ["b"]


def test_the_blind_referee_answers_without_image_or_answer_and_flags_a_planted_text_only_question():
    import random

    from processors.llm.request import LLMResult
    from processors.referees.blind import BlindReferee
    from processors.referees.protocol import RefereeItem
    from processors.referees.settings import RefereeSettings
    from processors.referees.simulate import respond

    settings = RefereeSettings(name="blind", preset="internvl2-26b", blind=True, see_answer=True)
    referee = BlindReferee(settings, None)
    planted = RefereeItem("q", "/img.png", "Math~Arithmetic", "What is 17 + 25?", "The answer is 42.")
    visual = [RefereeItem(f"v{i}", "/img.png", "Counting~Dogs", f"How many dogs are on sofa {i}?", "Three.")
              for i in range(50)]
    request = referee._request(planted, "structured_outputs")
    parts = [part for message in request.messages for part in message["content"]]
    assert all(part["type"] == "text" for part in parts)  # the image never travels
    text = " ".join(part["text"] for part in parts)
    assert "What is 17 + 25?" in text and "42" not in text  # the question alone: the model must answer it
    assert "extra_body" not in vars(request) or not request.extra_body  # a free answer, no digit constraint

    def ask(items):  # the simulated text-only model answers; the referee compares with the sample's answer
        results = [LLMResult(key=item.qa_id, ok=True,
                             raw_text=respond(referee._request(item, "none").messages, random.Random(k)))
                   for k, item in enumerate(items)]
        return referee.votes(items, [(None, "none")], [results])

    (vote,) = ask([planted])
    assert vote.vote == 1 and vote.p_yes == 1.0  # answered right without the image: flagged
    assert sum(v.vote for v in ask(visual)) < 5  # most questions need the image


@pytest.mark.parametrize("question, reference, reply, agrees", [
    ("Which animal?\nA. cat\nB. dog\nC. cow", "B", "The answer is B.", True),
    ("Which animal?\nA. cat\nB. dog\nC. cow", "B", "(A) cat", False),
    ("Which animal? (A) cat (B) dog", "(B) dog", "B", True),
    ("What is 6 * 7?", "42", "The product is 42", True),
    ("What colour is the car?", "Red.", "red", True),
    ("Is it raining?", "Yes", "No", False),
    ("How many dogs?", "Three.", "unknown", False),
    ("Describe the scene.", "A red car parked next to a large tree in a quiet park",
     "A red car is parked beside a big tree in a park", True),  # token F1 0.67
    ("Describe the scene.", "A red car parked next to a large tree in a quiet park",
     "Two children play football on a sunny beach near the sea", False),
])
def test_blind_answers_are_compared_by_letter_short_match_or_f1(question, reference, reply, agrees):
    from processors.referees.blind import answers_agree

    assert (answers_agree(question, reference, reply) >= 0.5) is agrees
