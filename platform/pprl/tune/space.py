"""The search space: a YAML mapping of ``section.field`` to one distribution, checked against the config system.

    loss.g_id: {loguniform: [0.1, 3.0]}
    optim.lr: {loguniform: [1.0e-4, 1.0e-3]}
    train.g_steps_per_d: {choice: [1, 2]}

A trial's parameters are a flat ``{"loss.g_id": 0.83, ...}`` dict, applied on top of the search's base config
exactly as ``--set loss.g_id=0.83`` would be, so every trial config is a valid :class:`pprl.config.Config`.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from pprl.config import Config

DEFAULT_SPACE = Path(__file__).with_name("search_space.yaml")
DISTRIBUTIONS = ("loguniform", "uniform", "choice")


@dataclass(frozen=True)
class Param:
    """One searched config field."""

    field: str  # section.field, as in --set
    kind: str  # loguniform | uniform | choice
    args: tuple  # (low, high) for the ranges, the values for choice

    def domain(self) -> Any:
        """The Ray Tune sampling domain."""
        from ray import tune

        if self.kind == "loguniform":
            return tune.loguniform(*self.args)
        if self.kind == "uniform":
            return tune.uniform(*self.args)
        return tune.choice(list(self.args))

    def to_dict(self) -> dict[str, list]:
        return {self.kind: list(self.args)}


def read_space(path: str | None = None) -> dict[str, Any]:
    """The raw mapping of a search-space YAML file (the packaged default when ``path`` is None)."""
    from pprl.storage import read_text

    source = str(path or DEFAULT_SPACE)
    try:
        data = yaml.safe_load(read_text(source))
    except yaml.YAMLError as err:
        raise ValueError(f"{source}: not valid YAML ({err})") from None
    if not isinstance(data, dict) or not data:
        raise ValueError(f"{source}: expected a mapping like `loss.g_id: {{loguniform: [0.1, 3.0]}}`, got {data!r}")
    parse_space(data, source)  # fail here, naming the file, rather than in the driver
    return data


def parse_space(data: dict[str, Any], where: str = "search space") -> list[Param]:
    """Validate the mapping's shape and numbers; :func:`check_space` then checks it against a config."""
    params = []
    for key, spec in data.items():
        name = f"{where}: {key}"
        if not isinstance(key, str) or key.count(".") != 1:
            raise ValueError(f"{where}: key {key!r} must be a config field written section.field, e.g. loss.g_id")
        if not isinstance(spec, dict) or len(spec) != 1:
            raise ValueError(f"{name}: expected one distribution, e.g. {{loguniform: [0.1, 3.0]}}, got {spec!r}")
        kind, args = next(iter(spec.items()))
        if kind not in DISTRIBUTIONS:
            raise ValueError(f"{name}: unknown distribution {kind!r}; choose one of {', '.join(DISTRIBUTIONS)}")
        params.append(Param(key, kind, _check_args(name, kind, args)))
    return params


def _check_args(name: str, kind: str, args: Any) -> tuple:
    if not isinstance(args, list) or not args:
        raise ValueError(f"{name}: {kind} needs a list, got {args!r}")
    if kind == "choice":
        return tuple(args)
    if len(args) != 2 or not all(isinstance(a, (int, float)) and not isinstance(a, bool) for a in args):
        raise ValueError(f"{name}: {kind} needs [low, high] numbers, got {args!r}")
    low, high = (float(a) for a in args)
    if not (math.isfinite(low) and math.isfinite(high)) or low >= high:
        raise ValueError(f"{name}: {kind} needs low < high, got [{low}, {high}]")
    if kind == "loguniform" and low <= 0:
        raise ValueError(f"{name}: loguniform needs low > 0, got {low}")
    return (low, high)


def check_space(params: list[Param], base: Config) -> None:
    """Every bound and choice, applied to ``base``, must give a valid config (unknown fields, types, ranges)."""
    for param in params:
        for value in param.args:
            try:
                apply_params(base.to_dict(), {param.field: value})
            except ValueError as err:
                raise ValueError(f"search space {param.field}: value {value!r} does not fit the config: {err}") from None


def apply_params(base: dict[str, Any], params: dict[str, Any]) -> Config:
    """``base`` (a ``Config.to_dict()``) with each ``section.field`` set to its value, validated."""
    data = copy.deepcopy(base)
    for key, value in params.items():
        section, _, name = key.partition(".")
        if not isinstance(data.get(section), dict):
            raise ValueError(f"unknown config section {section!r} in {key!r}")
        data[section][name] = value
    return Config.from_dict(data)


def base_point(params: list[Param], base: Config) -> dict[str, Any]:
    """The base config's own values of the searched fields: the paper's weights for the paper presets."""
    data = base.to_dict()
    return {p.field: data[p.field.partition(".")[0]][p.field.partition(".")[2]] for p in params}
