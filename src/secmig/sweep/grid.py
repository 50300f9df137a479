"""The grid language of sweeps: a base scenario, the values to try at dotted paths into it, the seeds.

A grid file::

    name: dirty-vs-policy             # optional; the file's stem by default
    scenario: base.yaml               # relative to the grid file, or a scenario mapping inline
    seeds: [1, 2, 3]                  # or a count N (seeds 0 … N-1); the scenario's own seed by default
    parameters:
      vms[0].dirty.rate: [5000pages/s, 20000pages/s]
      vms[name=db-1].ram: [4GiB, 8GiB]
      defaults.policy: [qemu, xen]

Every point (one value per parameter, one seed) is the base scenario with those values set, validated by
the same :func:`~secmig.sim.scenario.parse_scenario` / :func:`~secmig.sim.scenario.build_spec` as any
scenario, before anything runs. Points are keyed by a hash of the base scenario, their values and their
seed; the key does not cover the simulator's code: after changing it, sweep into a new folder.
"""

from __future__ import annotations

import copy
import hashlib
import math
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from itertools import product
from pathlib import Path
from typing import Any

from secmig.errors import ConfigError
from secmig.results.records import canonical_json
from secmig.sim.engine import SimulationSpec
from secmig.sim.scenario import build_spec, parse_scenario
from secmig.yamlfile import read_yaml

KEY_VERSION = "secmig-sweep/v1"

_TOKEN = re.compile(r"\.?([A-Za-z_][\w-]*)|\[(\d+)\]|\[([A-Za-z_][\w-]*)=([^\]]+)\]")


def parse_path(path: str) -> list[str | int | tuple[str, str]]:
    """``vms[0].dirty.rate`` → ``["vms", 0, "dirty", "rate"]``; ``vms[name=db-1]`` selects by a field."""
    out: list[str | int | tuple[str, str]] = []
    pos = 0
    while pos < len(path):
        m = _TOKEN.match(path, pos)
        if m is None or (pos == 0 and path.startswith(".")) or (pos > 0 and m.group(1) and path[pos] != "."):
            raise ConfigError(f"{path!r} is not a dotted path (e.g. vms[0].dirty.rate)")
        if m.group(1) is not None:
            out.append(m.group(1))
        elif m.group(2) is not None:
            out.append(int(m.group(2)))
        else:
            out.append((m.group(3), m.group(4)))
        pos = m.end()
    if not out or not isinstance(out[0], str):
        raise ConfigError(f"{path!r} is not a dotted path (e.g. vms[0].dirty.rate)")
    return out


def set_path(data: dict[str, Any], path: str, value: Any) -> None:
    """Set ``value`` at ``path`` in ``data`` (in place); missing mapping keys are created, list items are not."""
    steps = parse_path(path)
    node: Any = data
    for i, step in enumerate(steps):
        last = i == len(steps) - 1
        where = path
        if isinstance(step, str):
            if not isinstance(node, dict):
                raise ConfigError(f"{where}: {_render(steps[:i]) or 'the scenario'} is not a mapping")
            if last:
                node[step] = copy.deepcopy(value)
            else:
                node = node.setdefault(step, {})
            continue
        if not isinstance(node, list):
            raise ConfigError(f"{where}: {_render(steps[:i])} is not a list")
        if isinstance(step, int):
            if step >= len(node):
                raise ConfigError(f"{where}: index {step} is out of range ({_render(steps[:i])} has {len(node)} items)")
            idx = step
        else:
            field_name, want = step
            hits = [j for j, item in enumerate(node) if isinstance(item, dict) and str(item.get(field_name)) == want]
            if len(hits) != 1:
                raise ConfigError(f"{where}: {len(hits)} items of {_render(steps[:i])} have {field_name} = {want!r}")
            idx = hits[0]
        if last:
            node[idx] = copy.deepcopy(value)
        else:
            node = node[idx]


def _render(steps: Sequence[str | int | tuple[str, str]]) -> str:
    out = ""
    for s in steps:
        if isinstance(s, int):
            out += f"[{s}]"
        elif isinstance(s, tuple):
            out += f"[{s[0]}={s[1]}]"
        else:
            out += f".{s}" if out else s
    return out


def value_label(value: Any) -> str:
    """How a parameter value is shown in tables and plots."""
    return value if isinstance(value, str) else canonical_json(value)


@dataclass(frozen=True, slots=True)
class SweepPoint:
    """One point of a grid: its values, its seed, its key and the validated simulation it stands for."""

    index: int
    key: str
    params: tuple[tuple[str, Any], ...]
    seed: int
    spec: SimulationSpec = field(repr=False, compare=False)

    def params_dict(self) -> dict[str, Any]:
        return dict(self.params)

    def describe(self) -> str:
        return ", ".join(f"{p}={value_label(v)}" for p, v in self.params) + f", seed={self.seed}"


@dataclass(frozen=True, slots=True)
class Grid:
    """A parsed grid file."""

    name: str
    source: str
    base: dict[str, Any]
    base_dir: Path
    parameters: tuple[tuple[str, tuple[Any, ...]], ...]
    seeds: tuple[int, ...]

    @property
    def size(self) -> int:
        return math.prod(len(v) for _, v in self.parameters) * len(self.seeds)

    def combinations(self) -> Iterator[tuple[tuple[str, Any], ...]]:
        names = [p for p, _ in self.parameters]
        for values in product(*(v for _, v in self.parameters)):
            yield tuple(zip(names, values, strict=True))

    def points(self) -> list[SweepPoint]:
        """Every point, validated as a scenario (the first bad one raises :class:`ConfigError`)."""
        base_hash = hashlib.sha256(canonical_json(self.base).encode()).hexdigest()
        out: list[SweepPoint] = []
        for combo in self.combinations():
            for seed in self.seeds:
                data = copy.deepcopy(self.base)
                for path, value in combo:
                    try:
                        set_path(data, path, value)
                    except ConfigError as err:
                        raise ConfigError(f"{self.source}: parameters: {err}") from None
                data["seed"] = seed
                i = len(out)
                label = f"{self.source} (point {i}: " + ", ".join(f"{p}={value_label(v)}" for p, v in combo) + ")"
                spec = build_spec(parse_scenario(data, label), label, self.base_dir)
                key = hashlib.sha256(
                    canonical_json([KEY_VERSION, base_hash, [list(c) for c in combo], seed]).encode()
                ).hexdigest()[:32]
                out.append(SweepPoint(i, key, combo, seed, spec))
        return out


def parse_grid(data: Any, source: str, base_dir: Path) -> Grid:
    """Validate a loaded grid file; ``source`` names it in messages, ``base_dir`` resolves ``scenario:``."""
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: expected a mapping at the top level")
    unknown = sorted(set(data) - {"name", "scenario", "seeds", "parameters", "description"})
    if unknown:
        raise ConfigError(f"{source}: {unknown[0]}: unknown field (expected name, scenario, seeds, parameters)")
    scenario = data.get("scenario")
    scenario_dir = base_dir
    if isinstance(scenario, str):
        path = base_dir / scenario
        base = read_yaml(path, f"{source}: scenario:")
        scenario_dir = path.parent
    elif isinstance(scenario, dict):
        base = scenario
    else:
        raise ConfigError(f"{source}: scenario: required, a scenario file name or an inline scenario mapping")
    if not isinstance(base, dict):
        raise ConfigError(f"{source}: scenario: expected a mapping at the top level of the scenario")
    params = data.get("parameters") or {}
    if not isinstance(params, dict):
        raise ConfigError(f"{source}: parameters: expected a mapping of dotted path -> list of values")
    parameters = []
    for path, values in params.items():
        try:
            parse_path(str(path))
        except ConfigError as err:
            raise ConfigError(f"{source}: parameters: {err}") from None
        if not isinstance(values, list) or not values:
            raise ConfigError(f"{source}: parameters.{path}: expected a non-empty list of values")
        labels = [value_label(v) for v in values]
        if len(set(labels)) != len(labels):
            raise ConfigError(f"{source}: parameters.{path}: a value is listed twice")
        parameters.append((str(path), tuple(values)))
    seeds_raw = data.get("seeds")
    if seeds_raw is None:
        seeds: tuple[int, ...] = (int(base.get("seed", 0)) if isinstance(base.get("seed", 0), int) else 0,)
    elif isinstance(seeds_raw, int) and not isinstance(seeds_raw, bool) and seeds_raw >= 1:
        seeds = tuple(range(seeds_raw))
    elif (
        isinstance(seeds_raw, list)
        and seeds_raw
        and all(isinstance(s, int) and not isinstance(s, bool) for s in seeds_raw)
    ):
        seeds = tuple(seeds_raw)
        if len(set(seeds)) != len(seeds):
            raise ConfigError(f"{source}: seeds: a seed is listed twice")
    else:
        raise ConfigError(f"{source}: seeds: expected a positive count or a list of integers, got {seeds_raw!r}")
    name = data.get("name", Path(source).stem)
    if not isinstance(name, str) or not name:
        raise ConfigError(f"{source}: name: expected a non-empty string")
    return Grid(name, source, base, scenario_dir, tuple(parameters), seeds)


def load_grid(path: Path) -> Grid:
    """Read and validate a grid file (not yet its points: see :meth:`Grid.points`)."""
    return parse_grid(read_yaml(path), path.name, path.parent)
