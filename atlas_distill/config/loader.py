"""Finding, reading and resolving profiles: packaged and local profiles, YAML (also upstream's Hydra run
configs), dotted overrides and flags, in precedence order; every problem reported at once."""

from __future__ import annotations

import copy
import difflib
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from ..errors import ProfileError
from .schema import Profile, TrainerConfig

PACKAGED_PROFILES = Path(__file__).parent.parent / "profiles"
LOCAL_PROFILE_DIR = Path("profiles")


def profile_paths() -> list[tuple[str, Path]]:
    """Every profile a name can resolve to: ./profiles first, then the packaged ones."""
    found: dict[str, Path] = {}
    for folder in (LOCAL_PROFILE_DIR, PACKAGED_PROFILES):
        for path in sorted(folder.glob("*.yaml")) if folder.is_dir() else []:
            found.setdefault(path.stem, path)
    return sorted(found.items())


def resolve_profile_path(name_or_path: str) -> Path:
    if name_or_path.endswith((".yaml", ".yml")) or "/" in name_or_path:
        path = Path(name_or_path)
        if not os.path.isfile(path):  # unlike Path.is_file, False (not OSError) for a name too long
            raise ProfileError([f"profile file {name_or_path} does not exist"], fix="Check the path.")
        return path
    known = dict(profile_paths())
    if name_or_path in known:
        return known[name_or_path]
    close = difflib.get_close_matches(name_or_path, known, n=1)
    hint = f" Did you mean `{close[0]}`?" if close else ""
    raise ProfileError(
        [f"unknown profile `{name_or_path}`.{hint}"],
        fix=f"Known profiles: {', '.join(known)}; or pass a path to a YAML file.",
    )


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except RecursionError:
        raise ProfileError([f"{path}: nested too deeply to read (about 1,000 levels)"],
                           fix="A profile is a few levels of keys; see `atlas-distill profile show`.") from None
    except (OSError, ValueError, yaml.YAMLError) as exc:  # ValueError: not UTF-8, a date 2024-13-45, 5000 digits
        raise ProfileError([f"{path}: cannot be read as YAML: {exc}"],
                           fix="Fix the file's syntax or that value.") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ProfileError([f"{path}: the top level must be a mapping of keys, got {type(data).__name__}"])
    return data


_noted_upstream: set[Path] = set()


def _from_upstream(tree: dict[str, Any], path: Path) -> dict[str, Any]:
    """An upstream Atlas run config (configs/run/*.yaml) read as a profile: its Hydra `defaults:` list is ignored
    with one note (a profile is whole by itself, and train always runs GKD), its top-level `model_name_or_path`
    is the student (model.model_name_or_path), and a top-level trainer setting (lmbda, beta, ...) goes under
    trainer. Anything else is validated as ours."""
    if "defaults" not in tree and "model_name_or_path" not in tree and not set(tree) & set(TrainerConfig.model_fields):
        return tree
    tree = dict(tree)
    defaults = tree.pop("defaults", None)
    moved = []
    if "model_name_or_path" in tree:
        model = tree.get("model") if isinstance(tree.get("model"), dict) else {}
        tree["model"] = {**model, "model_name_or_path": tree.pop("model_name_or_path")}
        moved.append("model_name_or_path -> model.model_name_or_path")
    for key in [k for k in tree if k in TrainerConfig.model_fields and k not in Profile.model_fields]:
        trainer = tree.get("trainer") if isinstance(tree.get("trainer"), dict) else {}
        tree["trainer"] = {key: tree.pop(key), **trainer}  # a value under trainer: wins over a top-level one
        moved.append(f"{key} -> trainer.{key}")
    if path not in _noted_upstream:
        _noted_upstream.add(path)
        said = ([f"its Hydra `defaults` list ({_brief(defaults)}) is ignored: a profile is whole by itself and "
                 "`train` always runs GKD"] if defaults is not None else [])
        said += [f"read the upstream keys as ours ({', '.join(moved)})"] if moved else []
        print(f"Note: {path} is an upstream Atlas run config: {'; '.join(said)}.", file=sys.stderr, flush=True)
    return tree


def _brief(value: Any) -> str:
    try:
        text = yaml.safe_dump(value, default_flow_style=True, width=10_000).strip()
    except (yaml.YAMLError, RecursionError):
        text = type(value).__name__
    return text if len(text) <= 60 else text[:57] + "..."


def set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> None:
    """tree["a"]["b"] = value for `a.b`, making the levels that are missing."""
    parts = dotted.split(".")
    node = tree
    for part in parts[:-1]:
        child = node.get(part)
        if not isinstance(child, dict):
            child = {}
            node[part] = child
        node = child
    node[parts[-1]] = value


def _flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            flat.update(_flatten(value, dotted + "."))
        else:
            flat[dotted] = value
    return flat


def parse_override(text: str) -> tuple[str, Any]:
    """`trainer.min_reward=0.9` -> ("trainer.min_reward", 0.9); values are YAML scalars or lists."""
    key, sep, raw = text.partition("=")
    key = key.strip().lstrip("+")
    if not sep or not key or any(not part for part in key.split(".")):
        raise ProfileError(
            [f"override `{text}` is not of the form key.path=value"],
            fix="Write overrides as e.g. trainer.min_reward=0.9 or trainer.learning_key=null.",
        )
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except (yaml.YAMLError, ValueError, RecursionError):  # not a YAML value (e.g. 2024-13-45): the text as given
        value = raw
    return key, value


def known_keys(model: type[BaseModel] = Profile, prefix: str = "") -> list[str]:
    keys: list[str] = []
    for name, field in model.model_fields.items():
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            keys.extend(known_keys(annotation, f"{prefix}{name}."))
        else:
            keys.append(f"{prefix}{name}")
    return keys


def _closest_key(dotted: str) -> str | None:
    keys = known_keys()
    leaf = dotted.rsplit(".", 1)[-1]
    by_path = difflib.get_close_matches(dotted, keys, n=1, cutoff=0.6)
    if by_path:
        return by_path[0]
    by_leaf = [k for k in keys if difflib.get_close_matches(leaf, [k.rsplit(".", 1)[-1]], n=1, cutoff=0.75)]
    return by_leaf[0] if by_leaf else None


def _describe(error: dict[str, Any], sources: dict[str, str]) -> str:
    dotted = ".".join(str(p) for p in error["loc"])
    origin = sources.get(dotted) or next(
        (src for key, src in sources.items() if key.startswith(dotted + ".") or dotted.startswith(key + ".")),
        "defaults",
    )
    if error["type"] == "extra_forbidden":
        close = _closest_key(dotted)
        hint = f"; did you mean `{close}`?" if close else ""
        return f"{origin}: unknown key `{dotted}`{hint}"
    message = error["msg"].removeprefix("Value error, ")
    return f"{origin}: `{dotted}`: {message} (got {error.get('input')!r})"


def load_profile(
    profile: str | None = "default",
    overrides: list[str] | None = None,
    flags: dict[str, Any] | None = None,
) -> Profile:
    """Resolve a profile by name or path, apply overrides then flags (dotted keys, None = unset)."""
    tree: dict[str, Any] = {}
    sources: dict[str, str] = {}
    if profile:
        path = resolve_profile_path(profile)
        tree = _from_upstream(_read_yaml(path), path)
        sources.update({key: str(path) for key in _flatten(tree)})
    problems: list[str] = []
    for text in overrides or []:
        try:
            key, value = parse_override(text)
        except ProfileError as exc:
            problems.extend(exc.problems)
            continue
        set_dotted(tree, key, value)
        sources[key] = f"override `{text}`"
    for key, (flag, value) in _flag_items(flags):
        if isinstance(value, Widen):
            value = _widened(tree, key, value)
        set_dotted(tree, key, None if isinstance(value, Null) else value)
        sources[key] = f"flag {flag}"
    try:
        resolved = Profile.model_validate(tree)
    except ValidationError as exc:
        problems.extend(_describe(err, sources) for err in exc.errors())
        resolved = None
    if problems or resolved is None:
        raise ProfileError(problems, fix="Fix or remove those keys; `atlas-distill profile show` prints valid ones.")
    return resolved


class Widen(list):
    """A flag's values added to its key's list as resolved so far (--include-status pending), not replacing it."""


@dataclass(frozen=True)
class Null:
    """A flag that sets its key to null (--all-statuses): a plain None means the flag was not given."""


def _widened(tree: dict[str, Any], key: str, extra: Widen) -> list[Any] | Null:
    """The key's list from the tree so far (or its default) with `extra` added; a null list (keep all) stays null."""
    try:
        current = Profile.model_validate(tree).model_dump()
    except ValidationError:  # reported by the full validation that follows
        return list(extra)
    for part in key.split("."):
        current = current[part]
    return Null() if current is None else list(dict.fromkeys([*current, *extra]))


def _flag_items(flags: dict[str, Any] | None):
    """Flags arrive as {"--min-reward": ("trainer.min_reward", value)}; unset flags are skipped."""
    for flag, (key, value) in (flags or {}).items():
        if value is not None:
            yield key, (flag, value)


def profile_to_yaml(profile: Profile) -> str:
    from ..db import mask_url

    data = copy.deepcopy(profile.model_dump(mode="json"))
    if data["database"]["url"]:
        data["database"]["url"] = mask_url(data["database"]["url"])
    return yaml.safe_dump(data, sort_keys=False)
