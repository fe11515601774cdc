"""The path grammar of task types: names joined by ``~``, and what makes two names "the same".

Shared by the seed loader and the reply parser so that a seed, an imported ``tasktype.txt`` line and a
generated line all normalise the same way. Three forms of a name:

- the *display* form (``clean_name``): NFC, whitespace collapsed, first letter upper-cased when it was lower
  case (``scene text`` -> ``Scene text``; ``iPhone screenshots`` is left alone because its second letter is
  upper case). This is what lands in ``tasktype.txt``.
- the *key* (``name_key``): case-folded, hyphens/underscores as spaces, trailing punctuation dropped. Two
  siblings with equal keys are duplicates.
- the *path* (``join_path``): display names joined by ``~``; ``task_id`` is the ``text_id`` of it.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Sequence

from builder.ids import text_id

SEPARATOR = "~"
# Look-alikes of "~" seen in model output and hand-edited files: tilde operator, wave dash, fullwidth tilde,
# swung dash, small tilde.
ODD_TILDES = "\u223c\u301c\uff5e\u2053\u02dc"
_ODD_TILDE_RE = re.compile(f"[{ODD_TILDES}]")
_SPACES = re.compile(r"\s+")
_KEY_DROP = re.compile(r"[-_]+")
_TRAILING_PUNCT = ".;,:!?"
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")


# Unicode categories no task name contains: controls, format characters (zero-width spaces and joiners,
# bidirectional overrides, BOM), surrogates, private use and unassigned code points.
_INVISIBLE_CATEGORIES = {"Cc", "Cf", "Cs", "Co", "Cn"}
MIN_LETTERS = 3
MIN_LETTER_SHARE = 0.4  # of the characters that are not spaces
# Markup no task name needs: HTML/XML tags (``<img onerror=...>``, ``</script>``), template syntax
# (``{{ x }}``, ``{% x %}``) and Markdown code spans. A name travels into the card, the HTML sunburst, the
# sample browser and other models' prompts, where such text would be read as markup, not as a name.
_MARKUP = (("<", "markup character '<' (HTML)"), (">", "markup character '>' (HTML)"),
           ("{{", "template syntax '{{'"), ("}}", "template syntax '}}'"), ("{%", "template syntax '{%'"),
           ("%}", "template syntax '%}'"), ("`", "markup character '`' (Markdown code)"))


def name_problem(name: str) -> str | None:
    """Why ``name`` cannot be a task type name (decoding debris, invisible characters, markup, too few
    letters), or None. Shared by the seed loader and the reply parser, so both refuse the same names."""
    if "\ufffd" in name:
        return "replacement character U+FFFD (text that did not decode)"
    for ch in name:
        if unicodedata.category(ch) in _INVISIBLE_CATEGORIES and ch not in "\t":
            return f"invisible or control character U+{ord(ch):04X}"
    for token, problem in _MARKUP:
        if token in name:
            return problem
    visible = [ch for ch in name if not ch.isspace()]
    letters = sum(1 for ch in visible if ch.isalpha())
    if letters < MIN_LETTERS or letters < MIN_LETTER_SHARE * len(visible):
        return f"too few letters ({letters} of {len(visible)} characters)"
    return None


def normalize_tildes(text: str) -> str:
    """Replace every tilde look-alike by ``~``."""
    return _ODD_TILDE_RE.sub(SEPARATOR, text)


def has_control_chars(text: str) -> bool:
    return bool(_CONTROL.search(text))


def collapse(text: str) -> str:
    """NFC, any run of whitespace (including non-breaking and ideographic spaces) as one space, stripped."""
    return _SPACES.sub(" ", unicodedata.normalize("NFC", text)).strip()


def clean_name(name: str) -> str:
    """The display form of one name (see the module docstring)."""
    name = collapse(name).strip(_TRAILING_PUNCT + " ")
    if name and name[0].islower() and not (len(name) > 1 and name[1].isupper()):
        name = name[0].upper() + name[1:]
    return name


def name_key(name: str) -> str:
    """The comparison key of one name: equal keys = duplicate siblings."""
    key = _KEY_DROP.sub(" ", unicodedata.normalize("NFKC", name)).casefold()
    return collapse(key).strip(_TRAILING_PUNCT + " ")


def split_path(path: str) -> list[str]:
    """Split a ``~``-joined path (odd tildes accepted) into display names; empty segments are kept as ""."""
    return [clean_name(part) for part in normalize_tildes(path).split(SEPARATOR)]


def join_path(parts: Sequence[str]) -> str:
    return SEPARATOR.join(parts)


def path_key(parts: Sequence[str]) -> tuple[str, ...]:
    return tuple(name_key(p) for p in parts)


def task_id(parts: Sequence[str]) -> str:
    """The stable row id of a task type: hash of its normalised path."""
    return text_id(join_path([clean_name(p) for p in parts]))
