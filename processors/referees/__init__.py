"""VLM referees (design.md §7): vote 0/1 with p(1) on whether a task type and question suit an image.

Importing this package loads no model and no torch; ``LocalReferee`` lives in ``processors.referees.local``.
"""

from processors.referees.factory import build_referee
from processors.referees.presets import PRESETS, RefereePreset, get_preset
from processors.referees.prompt import PROMPT_VERSION, build_messages
from processors.referees.protocol import Referee, RefereeItem, Vote
from processors.referees.settings import RefereeSettings

__all__ = [
    "PRESETS", "PROMPT_VERSION", "Referee", "RefereeItem", "RefereePreset", "RefereeSettings", "Vote",
    "build_messages", "build_referee", "get_preset",
]
