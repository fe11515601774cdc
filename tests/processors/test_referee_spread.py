"""One referee over several servers: each image's questions on one server, the servers loaded evenly."""

from __future__ import annotations

from processors.referees import RefereeItem
from processors.referees.endpoint import spread_by_image


def _items(counts: list[int]) -> list[RefereeItem]:
    return [RefereeItem(f"q{i}-{j}", f"/images/{i}.png", "OCR", f"question {j}")
            for i, count in enumerate(counts) for j in range(count)]


def test_questions_of_one_image_stay_on_one_server_and_the_load_is_even():
    items = _items([(i % 7) + 1 for i in range(120)])  # 120 images, 1-7 questions each (477 questions)
    spread = spread_by_image(items, ["a", "b"])
    servers_of = {}
    for name, share in spread.items():
        for item in share:
            servers_of.setdefault(item.image_path, set()).add(name)
    assert all(len(names) == 1 for names in servers_of.values())
    sizes = sorted(len(share) for share in spread.values())
    assert sum(sizes) == len(items) and sizes[1] - sizes[0] <= 7  # at most one image's questions apart
    assert spread_by_image(list(reversed(items)), ["a", "b"]).keys() == spread.keys()
    again = spread_by_image(items, ["a", "b"])
    assert {n: [i.qa_id for i in s] for n, s in again.items()} == {n: [i.qa_id for i in s] for n, s in spread.items()}


def test_three_servers_share_the_questions_evenly():
    spread = spread_by_image(_items([2] * 90), ["a", "b", "c"])
    assert sorted(len(share) for share in spread.values()) == [60, 60, 60]
