"""The refusal every config section raises: the key, the value and what is allowed."""

from __future__ import annotations

__all__ = ["check", "one_of"]


def check(cond: bool, key: str, value, allowed: str) -> None:
    if not cond:
        raise ValueError(f"config key '{key}': value {value!r} is not allowed; expected {allowed}")


def one_of(key: str, value, choices) -> None:
    check(value in choices, key, value, f"one of {sorted(choices)}")
