"""The local transformers referee against a tiny random Llava: logits, batching, reuse, determinism."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
from PIL import Image  # noqa: E402

from processors.referees import RefereeItem, RefereeSettings  # noqa: E402
from processors.referees.local import LocalReferee  # noqa: E402
from processors.referees.tiny import build_tiny_llava  # noqa: E402

QUESTIONS = [
    ("OCR~Scene text", "What does the sign say?"),
    ("Counting", "How many red objects are there?"),
    ("Spatial reasoning", "What is to the left of the square?"),
]
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True)
def _offline_hf(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))


@pytest.fixture(scope="module")
def tiny():
    return build_tiny_llava(seed=0)


def make_items(folder: Path, n_images: int = 4) -> list[RefereeItem]:
    """Images of different sizes and colours, three questions each, listed question-major (not grouped)."""
    paths = []
    for i in range(n_images):
        path = folder / f"img{i}.png"
        image = Image.new("RGB", (48 + 16 * i, 40 + 8 * i), (40 * i, 200 - 30 * i, 90))
        image.paste((255, 255, 255), (4, 4, 20, 20 + i))
        image.save(path)
        paths.append(str(path))
    return [
        RefereeItem(qa_id=f"q{q}-i{i}", image_path=paths[i], task_type=t, question=text, answer=f"answer {i}")
        for q, (t, text) in enumerate(QUESTIONS) for i in range(n_images)
    ]


def referee(tiny, **overrides) -> LocalReferee:
    settings = RefereeSettings(name="tiny", preset="tiny-random-llava", device="cpu", **overrides)
    return LocalReferee(settings, model=tiny[0], processor=tiny[1])


def test_logits_equal_first_step_of_greedy_generate(tiny, tmp_path):
    """Our prefix-shared batched pass gives generate's first-step logits on a left-padded batch of different
    lengths: the full next-token logits match, greedy decoding restricted to the digit tokens emits our best
    digit token, and the vote is the digit with more probability mass."""
    model, processor = tiny
    ref = referee(tiny, batch_size=32)
    items = make_items(tmp_path)
    images = [Image.open(it.image_path).convert("RGB") for it in items[:4]]
    rows = [int(it.image_path[-5]) for it in items]
    ours = ref.next_token_logits(items, images, rows)
    votes = ref.score(items)

    texts = [ref.prompt(it) for it in items]
    inputs = processor(text=texts, images=[images[g] for g in rows], padding=True, padding_side="left",
                       return_tensors="pt")
    assert len(set(inputs["attention_mask"].sum(-1).tolist())) > 1  # padding really happens
    digit_ids = list(ref.digits.zero + ref.digits.one)
    with torch.inference_mode():
        free = model.generate(**inputs, max_new_tokens=1, do_sample=False, output_logits=True,
                              return_dict_in_generate=True)
        restricted = model.generate(**inputs, max_new_tokens=1, do_sample=False,
                                    prefix_allowed_tokens_fn=lambda batch_id, ids: digit_ids)
    torch.testing.assert_close(ours, free.logits[0], atol=1e-4, rtol=1e-4)
    first = restricted[:, inputs["input_ids"].shape[1]]
    ours_best = torch.tensor(digit_ids)[ours[:, digit_ids].argmax(-1)]
    assert first.tolist() == ours_best.tolist()
    answered = [int(processor.tokenizer.decode([t]).strip()) for t in first.tolist()]
    assert set(answered) == {0, 1}  # the random model says both, so the comparison is not vacuous
    probs = free.logits[0].softmax(-1)
    mass_one = probs[:, list(ref.digits.one)].sum(-1)
    mass_zero = probs[:, list(ref.digits.zero)].sum(-1)
    assert [v.vote for v in votes] == (mass_one > mass_zero).long().tolist()
    torch.testing.assert_close(torch.tensor([v.p_yes for v in votes]), mass_one / (mass_one + mass_zero),
                               atol=1e-5, rtol=1e-5)


def test_batched_equals_one_by_one_and_reuse_is_exact(tiny, tmp_path):
    items = make_items(tmp_path)
    batched = referee(tiny, batch_size=12).score(items)
    single = referee(tiny, batch_size=1).score(items)
    plain = referee(tiny, batch_size=5, reuse="none").score(items)
    assert [v.qa_id for v in batched] == [it.qa_id for it in items]
    for a, b, c in zip(batched, single, plain):
        assert a.vote == b.vote == c.vote
        assert a.p_yes == pytest.approx(b.p_yes, abs=1e-5)
        assert a.p_yes == pytest.approx(c.p_yes, abs=1e-5)


@pytest.mark.parametrize(("reuse", "expected"), [("auto", 4), ("none", 12)])
def test_each_image_is_encoded_once(tiny, tmp_path, reuse, expected):
    encoded = []
    hook = tiny[0].model.vision_tower.register_forward_hook(lambda mod, args, out: encoded.append(len(args[0])))
    try:
        referee(tiny, batch_size=12, reuse=reuse).score(make_items(tmp_path))
    finally:
        hook.remove()
    assert sum(encoded) == expected


def test_see_answer_changes_the_prompt(tiny, tmp_path):
    item = make_items(tmp_path, 1)[0]
    assert "answer 0" not in referee(tiny).prompt(item)
    assert "Proposed answer: answer 0" in referee(tiny, see_answer=True).prompt(item)


def test_broken_image_is_a_failure_value(tiny, tmp_path):
    items = make_items(tmp_path, 2)
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"\xff\xd8 not a jpeg")
    items.insert(1, RefereeItem(qa_id="bad", image_path=str(broken), task_type="OCR", question="?"))
    votes = referee(tiny, batch_size=4).score(items)
    assert [v.qa_id for v in votes] == [it.qa_id for it in items]
    assert votes[1].error == "image_corrupt" and votes[1].vote is None and votes[1].detail
    assert all(v.ok for i, v in enumerate(votes) if i != 1)


def test_votes_are_identical_in_a_fresh_process(tiny, tmp_path):
    items = make_items(tmp_path, 2)
    here = [v.p_yes for v in referee(tiny).score(items)]
    script = (
        "import json, sys\n"
        "from processors.referees import RefereeItem, RefereeSettings, build_referee\n"
        "items = [RefereeItem(**d) for d in json.loads(sys.argv[1])]\n"
        "ref = build_referee(RefereeSettings(name='t', preset='tiny-random-llava', device='cpu'))\n"
        "print(json.dumps([v.p_yes for v in ref.score(items)]))\n"
    )
    payload = json.dumps([it.__dict__ for it in items])
    env = {**os.environ, "PYTHONHASHSEED": "123", "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, "-c", script, payload], capture_output=True, text=True, env=env,
                         check=True, cwd=tmp_path, timeout=120)
    there = json.loads(out.stdout.strip().splitlines()[-1])
    assert there == pytest.approx(here, abs=1e-6)
