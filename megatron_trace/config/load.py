"""Load YAML + `key=value` overrides into the typed `Config`, failing early and precisely.

Unknown keys (with a suggestion), wrong types and out-of-range values all raise `ConfigError`
naming the key, the bad value and what is allowed, before any work starts.
"""

from __future__ import annotations

import dataclasses
import difflib
import os

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException, ValidationError

from .schema import Config

__all__ = ["ConfigError", "check_teacher_data", "config_to_dict", "dump_config", "load_config"]

PEEK_ROWS = 64  # rows of a local data file looked at for reference solutions
# Config keys that are Python keywords: written as the key in YAML and overrides, held in the
# dataclass field with a trailing underscore.
_KEYWORD_KEYS = {"rollout.async": "rollout.async_"}


class ConfigError(ValueError):
    pass


def _to_field_key(key: str) -> str:
    for user, field_ in _KEYWORD_KEYS.items():
        if key == user or key.startswith(user + "."):
            return field_ + key[len(user):]
    return key


def _to_user_key(key: str) -> str:
    for user, field_ in _KEYWORD_KEYS.items():
        if key == field_ or key.startswith(field_ + "."):
            return user + key[len(field_):]
    return key


def _rename(node, table: dict[str, str]):
    """Rename the nested keys of a DictConfig or dict in place (dotted paths in `table`)."""
    for src, dst in table.items():
        *parents, leaf = src.split(".")
        parent = node
        for p in parents:
            parent = parent.get(p) if hasattr(parent, "get") else None
            if parent is None:
                break
        if parent is not None and hasattr(parent, "keys") and leaf in parent:
            value = parent.pop(leaf)
            parent[dst.rsplit(".", 1)[-1]] = value
    return node


def _all_keys(node, prefix: str = "") -> list[str]:
    out = []
    for f in dataclasses.fields(node):
        key = f"{prefix}{f.name}"
        out.append(_to_user_key(key))
        value = getattr(node, f.name)
        if dataclasses.is_dataclass(value):
            out.extend(_all_keys(value, key + "."))
    return out


def _field_type(key: str) -> str:
    """The declared type of a dotted key, as written in the schema ("int", "float | None", ...)."""
    import re

    node = Config
    key = _to_field_key(key)
    parts = re.sub(r"\[\d+\]", "", key).split(".")
    for i, part in enumerate(parts):
        fields = {f.name: f for f in dataclasses.fields(node)}
        if part not in fields:
            return "?"
        if i == len(parts) - 1:
            return str(fields[part].type)
        node = type(getattr(node(), part))
    return "?"


def _explain(exc: OmegaConfBaseException, source: str) -> ConfigError:
    key = _to_user_key(getattr(exc, "full_key", None) or "?")
    if isinstance(exc, ConfigKeyError):
        close = difflib.get_close_matches(key, _all_keys(Config()), n=1)
        hint = f"; did you mean '{close[0]}'?" if close else ""
        return ConfigError(f"{source}: unknown config key '{key}'{hint}")
    if isinstance(exc, ValidationError):
        value = getattr(exc, "value", None)
        return ConfigError(f"{source}: config key '{key}': value {value!r} is not a valid {_field_type(key)}")
    return ConfigError(f"{source}: config key '{key}': {exc.msg if hasattr(exc, 'msg') else exc}")


def _load_yaml(path: str, seen: tuple[str, ...] = ()):
    """A YAML file with its `include:` list (paths relative to the file) merged in first."""
    real = os.path.realpath(path)
    if real in seen:
        raise ConfigError(f"{path}: include cycle ({' -> '.join(seen + (real,))})")
    if not os.path.exists(path):
        raise ConfigError(f"{seen[-1] if seen else '--config'}: included file {path} does not exist")
    node = OmegaConf.load(path)
    if isinstance(node, DictConfig):
        _rename(node, _KEYWORD_KEYS)
    includes = node.pop("include", None) if isinstance(node, DictConfig) else None
    if includes is None:
        return node
    if isinstance(includes, str):
        includes = [includes]
    base = OmegaConf.create()
    for inc in includes:
        base = OmegaConf.merge(base, _load_yaml(os.path.join(os.path.dirname(path), str(inc)), seen + (real,)))
    return OmegaConf.merge(base, node)


def load_config(path: str | None = None, overrides: list[str] | None = None) -> Config:
    """Defaults <- YAML file (after its `include:` files, in order) <- dotlist overrides, validated
    into a `Config`."""
    source = path or "defaults"
    if path is not None and not os.path.exists(path):
        raise ConfigError(f"--config {path} does not exist")
    for o in overrides or []:
        if "=" not in o:
            raise ConfigError(f"override {o!r} is not of the form key=value")
    try:
        merged = OmegaConf.structured(Config)
        if path is not None:
            merged = OmegaConf.merge(merged, _load_yaml(path))
        if overrides:
            source = f"{source} + overrides"
            dotlist = [_to_field_key(k) + "=" + v for k, v in (o.split("=", 1) for o in overrides)]
            merged = OmegaConf.merge(merged, OmegaConf.from_dotlist(dotlist))
        cfg = OmegaConf.to_object(merged)
    except OmegaConfBaseException as exc:
        raise _explain(exc, source) from None
    except ValueError as exc:  # our __post_init__ range checks
        raise ConfigError(f"{source}: {exc}") from None
    return cfg  # type: ignore[return-value]


def check_teacher_data(cfg: Config) -> None:
    """Refuse a variant that distils from the privileged teacher when `teacher.context` shows a
    reference solution and the data has none: the teacher would then see the problem and at most
    a one-word diagnostic, and the KL would carry almost nothing. `teacher.context=type_only` or
    `answer_and_type` need no solutions; `data.answer_only_teacher=true` keeps the solution
    contexts and shows the gold answer where a row has no solution.

    Called by `megatron-trace train` (and --dry-run), not by `load_config`: it reads the data.
    Only the first PEEK_ROWS rows of a local file are read. A hub name is not refused (its rows
    cannot be read offline at config time), nor is a local path that does not exist: training
    fails on it with "does not exist" when it opens the data, and recipes must load without their
    data (MT_DATA unset) for dry-runs and the launchers.
    """
    from ..data.problems import peek_has_solution
    from ..loss.routed import ROUTE_VARIANTS

    variant = cfg.loss.variant
    uses_teacher = ROUTE_VARIANTS[variant].mask is not None and cfg.schedule.lambda0 > 0
    needs_solution = cfg.teacher.context in ("solution_and_type", "solution")
    # train_only replays saved records, whose teacher inputs were built when they were recorded.
    if not uses_teacher or not needs_solution or cfg.data.answer_only_teacher or cfg.train.mode == "train_only":
        return
    if peek_has_solution(cfg.data.source, PEEK_ROWS) is False:
        raise ConfigError(
            f"loss.variant={variant} with teacher.context={cfg.teacher.context} shows the teacher a reference "
            f"solution, but data.source {cfg.data.source} has none (no non-empty 'solution' in its first {PEEK_ROWS} "
            "rows). Make data with solutions with tools/prepare_data.py (python tools/prepare_data.py --source "
            "open-thoughts/OpenThoughts-114k --out DIR, then data.source=DIR/train.jsonl); or set "
            "teacher.context=type_only (the diagnostic type alone) or answer_and_type (the gold answer and the "
            "type); or data.answer_only_teacher=true (the gold answer where a row has no solution)")


def dump_config(cfg: Config) -> str:
    """The resolved config as YAML (what `--dry-run` prints and the run directory keeps)."""
    return OmegaConf.to_yaml(_rename(OmegaConf.to_container(OmegaConf.structured(cfg)),
                                     {v: k for k, v in _KEYWORD_KEYS.items()}))


def config_to_dict(cfg: Config) -> dict:
    """The resolved config as plain Python containers (W&B, cache keys)."""
    return _rename(OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True),
                   {v: k for k, v in _KEYWORD_KEYS.items()})
