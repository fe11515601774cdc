"""One module per trainer's data format; ``FORMATS`` is the table the export reads (a new format is its module
and one line here)."""

from __future__ import annotations

from processors.publish.formats import internvl, llamafactory, llava, qwenvl, swift, trl
from processors.publish.formats.base import Format

FORMATS: dict[str, Format] = {
    module.FORMAT.name: module.FORMAT for module in (llava, trl, llamafactory, swift, internvl, qwenvl)
}
