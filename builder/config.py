"""The run config: one typed model per stage, composed into a run config, loaded from YAML.

Each stage's config model lives beside the stage (so adding a stage touches its module, the stage list and a
test); this module composes them with the run settings and any extra top-level sections (such as ``llm``)
into one pydantic model, validates a YAML file against it, and turns validation errors into one message
that names every bad key and what was expected. This is the only module that reads YAML.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, create_model

from builder.secrets import looks_like_key, mask_keys
from builder.stage import Stage


class ConfigError(ValueError):
    """A config that cannot run. The message names the file, every bad key and what was expected."""


def _resolve(path: Path, info: ValidationInfo) -> Path:
    """Relative paths in a config are relative to the config file, not to wherever the command ran."""
    base = (info.context or {}).get("base_dir")
    path = Path(os.path.expanduser(str(path)))
    if not path.is_absolute() and base is not None:
        path = Path(base) / path
    return path


def _must_exist(path: Path, info: ValidationInfo) -> Path:
    path = _resolve(path, info)
    if not path.exists():
        raise ValueError(f"no such file or folder: {path}")
    return path


ConfigPath = Annotated[Path, AfterValidator(_resolve)]
"""A path resolved against the config file's folder."""
ExistingPath = Annotated[Path, AfterValidator(_must_exist)]
"""A path resolved against the config file's folder that must exist when the config is loaded."""


class RayResources(BaseModel):
    """``run.ray_resources.<stage>``: what one Ray worker of that stage gets, instead of what the stage asks
    for (``Stage.resources``); keys left out keep the stage's own."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: Literal["cpu", "gpu", "llm"] | None = Field(
        None, description="cpu = a Ray task per shard; gpu/llm = a fixed pool of actors (model/clients built once)")
    num_cpus: float | None = Field(None, ge=0, description="CPUs per worker")
    num_gpus: float | None = Field(
        None, ge=0, description="GPUs per actor; fractions share a GPU (0.5: two CLIP actors per GPU)")
    workers: int | None = Field(
        None, ge=1, description="actors in the pool (default: one per GPU; 4 for LLM stages)")
    driver_node: bool | None = Field(
        None, description="run the workers on the driver's node only (default: yes for stages that call an LLM "
        "endpoint and for images - their SQLite request cache / ledger is safe within one host only); false "
        "where the run folder's filesystem gives SQLite working locks across hosts")

    def given(self) -> dict[str, Any]:
        return self.model_dump(exclude_none=True)


class RunSettings(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$", description="run name; default folder runs/<name>")
    run_dir: ConfigPath | None = Field(None, description="run folder (relative to the config file); default runs/<name> in the current folder")
    shard_size: int = Field(1000, ge=1, description="input rows per shard: the unit of resume")
    # Neither key is part of any fingerprint (the runner hashes stage configs only): where shards run never
    # changes what they produce, so a run may switch engines between resumes.
    engine: Literal["local", "ray"] = Field(
        "local", description="how shards are executed: local = this process; ray = Ray workers (docs/scaling.md)")
    # Left out of dumps when unset, so a local run's config.yaml and card are what they always were.
    ray_address: str | None = Field(
        None, exclude_if=lambda value: value is None,
        description="engine: ray only: the cluster to join (e.g. 'auto' on a node of a running cluster, or "
        "'ray://head:10001'); null = start a local Ray on this machine")
    ray_resources: dict[str, RayResources] = Field(
        default_factory=dict, exclude_if=lambda value: not value,
        description="engine: ray only: per stage name, the resources of one worker (num_gpus, num_cpus, workers, "
        "kind), overriding what the stage asks for (Stage.resources)")
    seed: int = Field(0, description="seed for every sampling decision, so reruns are reproducible")
    # The engine's stall watchdog (builder/engine.py); like the engine, never part of a fingerprint.
    stall_warn_s: float | None = Field(
        300, ge=0, description="a shard with no sign of life (no row finished, no model batch, no LLM reply) "
        "for this long is named in a warning; 0 or null = never")
    stall_timeout_s: float | None = Field(
        1800, ge=0, description="... and for this long stops the run with an error (finished shards are kept, a "
        "rerun resumes); 0 or null = never")


class RunConfigBase(BaseModel):
    """The base of every composed run config (``build_config_model``): the model ``dump_config`` dumps as
    given rather than in full."""

    model_config = ConfigDict(extra="forbid", frozen=True)


def build_config_model(stages: Sequence[Stage], sections: Mapping[str, type[BaseModel]] | None = None):
    """Compose the run config model from the stage list and extra top-level sections."""
    stage_fields: dict[str, Any] = {}
    for stage in stages:
        try:
            default = stage.Config()
            stage_fields[stage.name] = (stage.Config, default)
        except ValidationError:  # the stage has required keys: the config must give them
            stage_fields[stage.name] = (stage.Config, ...)
    stages_model = create_model(
        "StagesConfig", __config__=ConfigDict(extra="forbid", frozen=True), **stage_fields
    )
    section_fields = {name: (model, model()) for name, model in (sections or {}).items()}
    return create_model(
        "RunConfig",
        __base__=RunConfigBase,
        run=(RunSettings, ...),
        stages=(stages_model, stages_model.model_construct() if not _required(stages_model) else ...),
        **section_fields,
    )


def _required(model: type[BaseModel]) -> bool:
    return any(f.is_required() for f in model.model_fields.values())


def load_config(path: str | os.PathLike, model: type[BaseModel]) -> BaseModel:
    """Read and validate a YAML config; raise ConfigError with every problem, before anything runs."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read config file {path}: {exc}") from None
    try:
        data = yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 - a SafeLoader subclass
    except DuplicateKeyError as exc:
        raise ConfigError(f"{path}: {exc}; nothing was run") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path} is not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping with keys 'run' and 'stages' at the top level")
    return validate_config(data, model, base_dir=path.resolve().parent, origin=str(path))


class DuplicateKeyError(yaml.YAMLError):
    """A mapping names one key twice: YAML keeps the last silently, which is never what a config meant."""


class _UniqueKeyLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that refuses a key given twice in one mapping (naming it and both lines)."""


def _unique_mapping(loader: _UniqueKeyLoader, node: yaml.MappingNode, deep: bool = False) -> dict:
    seen: dict[Any, int] = {}
    for key_node, _ in node.value:
        if key_node.tag == "tag:yaml.org,2002:merge":
            continue
        key = loader.construct_object(key_node, deep=True)
        line = key_node.start_mark.line + 1
        if key in seen:
            raise DuplicateKeyError(f"key {key!r} is given twice in one mapping, on line {seen[key]} and on line "
                                    f"{line} (the second would silently replace the first): keep one")
        seen[key] = line
    return loader.construct_mapping(node, deep=deep)


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _unique_mapping)


def validate_config(data: dict, model: type[BaseModel], *, base_dir: Path, origin: str = "config"):
    try:
        return model.model_validate(data, context={"base_dir": base_dir})
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc, model, origin)) from None


def format_validation_error(exc: ValidationError, model: type[BaseModel], origin: str) -> str:
    lines = [f"{origin}: {exc.error_count()} problem(s) in the config; nothing was run:"]
    for error in exc.errors():
        key = ".".join(str(part) for part in error["loc"]) or "(top level)"
        if error["type"] == "extra_forbidden":
            allowed = _allowed_keys(model, error["loc"][:-1])
            hint = f"; expected one of: {', '.join(allowed)}" if allowed else ""
            lines.append(f"  - {key}: unknown key{hint}")
        elif error["type"] == "missing":
            lines.append(f"  - {key}: required key is missing")
        else:
            given = error.get("input")
            hidden = isinstance(given, (dict, list)) or (isinstance(given, str) and looks_like_key(given))
            shown = "" if hidden or "not shown" in error["msg"] else f" (got {mask_keys(repr(given))})"
            lines.append(f"  - {key}: {error['msg']}{shown}")
    return "\n".join(lines)


def _allowed_keys(model: type[BaseModel], loc: Sequence[Any]) -> list[str]:
    """Walk the model along ``loc`` to list the keys that are allowed there."""
    current: Any = model
    for part in loc:
        fields = getattr(current, "model_fields", None)
        if not fields or part not in fields:
            return []
        current = fields[part].annotation
        current = next((a for a in getattr(current, "__args__", ()) if hasattr(a, "model_fields")), current)
    fields = getattr(current, "model_fields", None)
    return sorted(fields) if fields else []


def read_config_data(path: str | os.PathLike) -> dict:
    """A YAML mapping written by this project (a run folder's ``config.yaml``) as plain data, unvalidated:
    for readers such as the dataset card that need a few keys of a finished run; {} when absent or unreadable."""
    try:
        data = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return {}
    return data if isinstance(data, dict) else {}


def dump_config(config: BaseModel, *, as_given: bool | None = None) -> dict:
    """The config as plain JSON-able data.

    A whole run config (``build_config_model``) is dumped *as given* (the run folder's ``config.yaml``): the
    keys its file set, at every level, and none it left out, so that file loads back to the config that ran.
    A key left unset can mean something of its own — a referee preset sizes the images of an endpoint that
    leaves ``image_max_side`` unset (``RefereeSettings.endpoint_overrides``) — which its default, spelled
    out, would not: a rerun from a fully spelled-out copy recomputed the score stage. Any other model (a
    stage's config, recorded in its ``state.json``) is dumped in full. ``as_given`` forces one or the other.
    No fingerprint is made of this dump (stages hash their own configs in full, ``Stage.fingerprint_config``)."""
    if as_given is None:
        as_given = isinstance(config, RunConfigBase)
    return config.model_dump(mode="json", exclude_unset=as_given)


def dump_yaml(data: Any) -> str:
    """YAML for the run folder's ``config.yaml`` (which the dataset card shows): anything key-shaped masked, a
    last guard should a secret have reached a free-text field."""
    return mask_keys(yaml.safe_dump(data, sort_keys=False, allow_unicode=True))
