"""Reading taxonomy seeds: a YAML tree, or ``~``-joined lines (the paper's ``tasktype.txt`` format).

Both formats give a list of paths; every prefix of a path is a node of the tree, so ``OCR~Scene text`` makes
``OCR`` a first-level category with one child. What gets normalised silently (and noted): a byte-order mark
(UTF-8 or UTF-16), CRLF line ends, blank lines, ``#`` comment lines (line format only), tilde look-alikes
(``∼`` ``〜`` ``～``), spaces around ``~``, lower-case first letters, duplicate paths (case and whitespace
variants included; the first one wins). What is rejected, with its line number: lines that are not UTF-8,
empty names (``A~~B``, a trailing ``~``), control characters, names over ``max_name_chars``, paths deeper
than ``max_depth``. With ``strict=True`` (the default) any rejected line raises ``SeedError`` naming all of
them, so a bad seed file stops the run before a request is sent.
"""

from __future__ import annotations

import codecs
import logging
from dataclasses import dataclass, field
from pathlib import Path

from loaders.taxonomy.names import (ODD_TILDES, SEPARATOR, clean_name, has_control_chars, name_problem,
                                    normalize_tildes, path_key)

logger = logging.getLogger(__name__)

YAML_SUFFIXES = (".yaml", ".yml")
MAX_SHOWN_PROBLEMS = 20


class SeedError(ValueError):
    """A seed or task-type file with lines that cannot be used; the message names each line."""


@dataclass(frozen=True)
class SeedPath:
    parts: tuple[str, ...]
    line: int
    origin: str


SHOWN_CHARS = 200  # of a bad line, in an error message (a 100 KB line is not echoed whole)


@dataclass(frozen=True)
class SeedProblem:
    line: int
    reason: str  # snake_case: not_utf8, empty_name, control_character, too_long, too_deep, yaml_error
    text: str

    def __str__(self) -> str:
        shown = self.text if len(self.text) <= SHOWN_CHARS else f"{self.text[:SHOWN_CHARS]}... ({len(self.text)} characters)"
        return f"line {self.line}: {self.reason.replace('_', ' ')}: {shown!r}"


@dataclass
class SeedList:
    """The usable paths of a file (deduplicated, in file order), the rejected lines and what was normalised."""

    source: str
    paths: list[SeedPath] = field(default_factory=list)
    problems: list[SeedProblem] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    seen: dict[tuple[str, ...], int] = field(default_factory=dict, repr=False)  # path key -> first line

    def raise_if_problems(self) -> None:
        if not self.problems:
            return
        shown = "\n".join(f"  {self.source}: {p}" for p in self.problems[:MAX_SHOWN_PROBLEMS])
        more = len(self.problems) - MAX_SHOWN_PROBLEMS
        tail = f"\n  ... and {more} more" if more > 0 else ""
        raise SeedError(f"{self.source}: {len(self.problems)} unusable line(s); nothing was run:\n{shown}{tail}")


def read_seeds(
    path: str | Path, *, origin: str = "seed", strict: bool = True, max_depth: int = 6, max_name_chars: int = 120
) -> SeedList:
    """Read a seed file; YAML by suffix (``.yaml``/``.yml``), otherwise ``~``-joined lines."""
    path = Path(path)
    seeds = SeedList(source=str(path))
    lines = decode_lines(path.read_bytes(), seeds)
    if path.suffix.lower() in YAML_SUFFIXES:
        raw = _yaml_paths(lines, seeds)
    else:
        raw = _line_paths(lines, seeds)
    for line, text in raw:
        _add_path(seeds, line, text, origin, max_depth=max_depth, max_name_chars=max_name_chars)
    for note in seeds.notes:
        logger.debug("%s: %s", path, note)
    if strict:
        seeds.raise_if_problems()
        if not seeds.paths:
            raise SeedError(f"{path}: no task type in the file (it is empty, or only blank lines and comments); "
                            "nothing was run")
    return seeds


def read_tasktypes(path: str | Path, *, strict: bool = True, max_depth: int = 6) -> SeedList:
    """Import an existing ``tasktype.txt`` (e.g. the released TaskGalaxy list): its paths, origin "imported"."""
    return read_seeds(path, origin="imported", strict=strict, max_depth=max_depth, max_name_chars=200)


def decode_lines(data: bytes, seeds: SeedList) -> list[tuple[int, str]]:
    """Split bytes into numbered text lines; a line that is not UTF-8 becomes a problem, not a guess."""
    if data.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        seeds.notes.append("UTF-16 file (byte-order mark) read as UTF-16")
        try:
            data = data.decode("utf-16").encode("utf-8")
        except UnicodeDecodeError as exc:  # e.g. an odd number of bytes: a truncated or mislabelled file
            seeds.problems.append(SeedProblem(0, "not_utf16", f"the file starts with a UTF-16 byte-order mark but "
                                              f"is not UTF-16 ({exc.reason} at byte {exc.start})"))
            return []
    elif data.startswith(codecs.BOM_UTF8):
        seeds.notes.append("UTF-8 byte-order mark removed")
        data = data[len(codecs.BOM_UTF8) :]
    lines = []
    if b"\r" in data and b"\n" not in data:  # classic Mac line endings: CR alone ends each line
        data = data.replace(b"\r", b"\n")
    for number, raw in enumerate(data.split(b"\n"), start=1):
        raw = raw.rstrip(b"\r")
        try:
            lines.append((number, raw.decode("utf-8")))
        except UnicodeDecodeError as exc:
            bad = raw[max(0, exc.start - 8) : exc.end + 8]
            seeds.problems.append(SeedProblem(number, "not_utf8", f"{bad!r} (byte {exc.start})"))
    return lines


def _line_paths(lines: list[tuple[int, str]], seeds: SeedList) -> list[tuple[int, str]]:
    out = []
    for number, text in lines:
        stripped = text.strip()
        if stripped and not stripped.startswith("#"):
            out.append((number, stripped))
    return out


def _add_path(seeds: SeedList, line: int, text: str, origin: str, *, max_depth: int, max_name_chars: int) -> None:
    if any(ch in text for ch in ODD_TILDES):
        seeds.notes.append(f"line {line}: tilde look-alike read as '~'")
    if has_control_chars(text):
        seeds.problems.append(SeedProblem(line, "control_character", text))
        return
    parts = [clean_name(p) for p in normalize_tildes(text).split(SEPARATOR)]
    if any(not p for p in parts):
        seeds.problems.append(SeedProblem(line, "empty_name", text))
        return
    if len(parts) > max_depth:
        seeds.problems.append(SeedProblem(line, "too_deep", text))
        return
    problems = [problem for problem in map(name_problem, parts) if problem]
    if problems:
        seeds.problems.append(SeedProblem(line, "bad_name", f"{problems[0]}: {text[:200]!r}"))
        return
    if any(len(p) > max_name_chars for p in parts):
        seeds.problems.append(SeedProblem(line, "too_long", text))
        return
    key = path_key(parts)
    if key in seeds.seen:
        seeds.notes.append(f"line {line}: duplicate of line {seeds.seen[key]} dropped")
        return
    seeds.seen[key] = line
    seeds.paths.append(SeedPath(tuple(parts), line, origin))



def _yaml_paths(lines: list[tuple[int, str]], seeds: SeedList) -> list[tuple[int, str]]:
    """Walk the YAML node graph (not the loaded dict) so every name keeps its line and duplicate keys survive."""
    import yaml

    text = "\n".join(line for _, line in lines)
    try:
        # Aliases are refused before anything is built: a few hundred bytes of nested aliases expand into
        # billions of names (an "alias bomb"); a seed file has no use for them.
        for event in yaml.parse(text, Loader=yaml.SafeLoader):
            if isinstance(event, yaml.AliasEvent):
                seeds.problems.append(SeedProblem(event.start_mark.line + 1, "yaml_alias",
                                                  f"alias *{event.anchor[:40]} refused: write each name out"))
                return []
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        seeds.problems.append(SeedProblem(mark.line + 1 if mark else 0, "yaml_error", str(exc).splitlines()[0]))
        return []
    out: list[tuple[int, str]] = []
    if root is not None:
        _walk_yaml(root, "", out, seeds)
    return out


def _walk_yaml(node, prefix: str, out: list[tuple[int, str]], seeds: SeedList) -> None:
    import yaml

    join = (lambda name: f"{prefix}{SEPARATOR}{name}") if prefix else (lambda name: name)
    if isinstance(node, yaml.MappingNode):
        for key_node, value_node in node.value:
            if not isinstance(key_node, yaml.ScalarNode):
                seeds.problems.append(SeedProblem(key_node.start_mark.line + 1, "yaml_error", "a key must be a name"))
                continue
            path = join(str(key_node.value))
            out.append((key_node.start_mark.line + 1, path))
            _walk_yaml(value_node, path, out, seeds)
    elif isinstance(node, yaml.SequenceNode):
        for item in node.value:
            _walk_yaml(item, prefix, out, seeds)
    elif isinstance(node, yaml.ScalarNode) and node.tag != "tag:yaml.org,2002:null" and str(node.value).strip():
        out.append((node.start_mark.line + 1, join(str(node.value))))
