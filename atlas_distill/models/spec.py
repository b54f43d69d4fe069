"""Model specs: what a spec names (builtin, size alias, local directory, hub id, pruned copy), resolved without
touching weights, and what is known of a model from its config alone."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from ..errors import ModelSpecError
from ..families import DEFAULT_FAMILY
from .builtin import BUILTIN_NAME
from .cache import built_model_dir
from .registry import BUILTINS

_ALIAS = re.compile(r"(\d+(?:\.\d+)?)b", re.IGNORECASE)
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*")
_LAYERS = re.compile(r"(\d+)L", re.IGNORECASE)


@dataclass(frozen=True)
class ModelSpec:
    """A resolved model spec: what it names, before anything is loaded or built."""

    spec: str
    """The spec as given."""
    kind: Literal["builtin", "alias", "local", "hub", "pruned"]
    """builtin: smollm2-135m (or the demo teacher smollm2-135m-crm); alias: a size in `family`; local: a directory; hub: org/name; pruned: BASE@NL."""
    source: str
    """A Hugging Face id or a local directory; for pruned, the base's source."""
    name: str
    """Short display name: smollm2-135m@15L, Qwen2.5-7B-Instruct."""
    base: ModelSpec | None = None
    """The model a pruned spec keeps layers of."""
    keep_layers: int | None = None
    """How many decoder layers a pruned spec keeps."""

    @property
    def unpruned(self) -> ModelSpec:
        """The model whose files and config this one derives from: its base when pruned, else itself."""
        return self.base if self.kind == "pruned" else self


def _accepted_forms(family: str) -> str:
    return (f"Use one of: `{BUILTIN_NAME}` (builtin, no network); a size alias 14b, 7b, 3b, 1.5b, 0.5b "
            f"(-> {family.format(size='<N>B')}); a local directory holding config.json; a Hugging Face id "
            f"`org/name`; or `SPEC@NL`, a copy of SPEC keeping N decoder layers (e.g. `{BUILTIN_NAME}@15L`).")


def resolve_model_spec(spec: str, family: str = DEFAULT_FAMILY) -> ModelSpec:
    """Parse a model spec into what it names. Reads at most a config.json; never loads weights."""
    if "{size}" not in family:
        raise ModelSpecError(f"model family `{family}` has no `{{size}}` placeholder.",
                             fix="Set `model.family` to e.g. Qwen/Qwen2.5-{size}-Instruct.")
    fix = _accepted_forms(family)
    text = spec.strip()
    path = Path(text).expanduser()
    if text.lower() in BUILTINS:
        return ModelSpec(spec, "builtin", text.lower(), text.lower())
    if text and path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelSpecError(f"model spec `{spec}`: directory {path} has no config.json, so it is not "
                                 "a saved model.", fix="Point at the directory save_pretrained wrote.")
        return ModelSpec(spec, "local", str(path.resolve()), path.resolve().name)
    if "@" in text:
        return _resolve_pruned(spec, text, family)
    if _ALIAS.fullmatch(text):
        source = family.format(size=text[:-1] + "B")
        return ModelSpec(spec, "alias", source, source.rsplit("/", 1)[-1])
    if text.startswith(("/", "./", "../", "~")):
        raise ModelSpecError(f"model spec `{spec}`: no directory {path} exists.", fix=fix)
    if _HUB_ID.fullmatch(text):
        return ModelSpec(spec, "hub", text, text.split("/")[1])
    raise ModelSpecError(f"model spec `{spec}` is not a model spec this tool understands.", fix=fix)


def _resolve_pruned(spec: str, text: str, family: str) -> ModelSpec:
    base_text, _, layers = text.rpartition("@")
    match = _LAYERS.fullmatch(layers)
    if not base_text or not match or int(match.group(1)) < 1:
        raise ModelSpecError(f"model spec `{spec}`: a pruned copy is written BASE@NL with a base model and "
                             "N >= 1 layers to keep.", fix=_accepted_forms(family))
    keep = int(match.group(1))
    try:
        base = resolve_model_spec(base_text, family)
    except ModelSpecError as exc:
        raise ModelSpecError(f"in `{spec}`: {exc.message}", fix=exc.fix) from None
    pruned = ModelSpec(spec, "pruned", base.source, f"{base.name}@{keep}L", base=base, keep_layers=keep)
    check_keep_layers(pruned, _layer_count(base))
    return pruned


def _layer_count(spec: ModelSpec) -> int | None:
    """The number of decoder layers, when it is known without loading or building anything."""
    if spec.kind == "pruned":
        return spec.keep_layers
    if spec.kind == "local":
        import json

        try:
            config = json.loads((Path(spec.source) / "config.json").read_text())
        except (OSError, ValueError):
            return None  # left to from_pretrained, which says what is wrong with the file
        return config.get("num_hidden_layers") if isinstance(config, dict) else None
    return None


def check_keep_layers(spec: ModelSpec, total: int | None) -> None:
    """A pruned spec must keep fewer layers than its base has (when that number is known)."""
    if total is not None and spec.keep_layers >= total:
        raise ModelSpecError(f"model spec `{spec.spec}` keeps {spec.keep_layers} layers, but {spec.base.name} "
                             f"has only {total}.", fix=f"Keep fewer than {total} layers (BASE@NL, 1 <= N < {total}).")



def model_parameters(spec: ModelSpec) -> int | None:
    """The parameter count from a config alone (no weights): a local or already built model's config.json, or
    what the tool knows of the Qwen2.5 family; None when neither is at hand."""
    from ..families import known_config, local_config, parameter_count

    base, layers = spec.unpruned, spec.keep_layers
    if base.kind in ("hub", "alias"):
        config = known_config(base.source)
    elif base.kind == "builtin":
        config = local_config(str(built_model_dir(base.source)))  # once it is built
    else:
        config = local_config(base.source)
    return parameter_count(config, layers) if config else None


def tokenizer_family(spec: ModelSpec) -> str | None:
    """The family whose one tokenizer the model uses, when the tool knows it without the model's files."""
    from ..families import known_config

    base = spec.unpruned
    config = known_config(base.source) if base.kind in ("hub", "alias") else None
    return config["family"] if config else None
