"""What a sweep tries: parse ``--grid`` / ``--range`` / ``--set`` texts and spec files, expand to trials.

A trial is a set of config overrides ``{key: text}`` where ``key`` is a config field name as accepted by
``train.config.apply_overrides`` (dotted, e.g. ``model.dropout``, or a flat alias such as ``lr``) and
``text`` is the value exactly as it will be passed on (``"key=text"``), so a trial can always be re-run
with ``r2 train --set key=text``.

Syntax (command line and spec files alike):

- grid: ``lr=1e-4,2.5e-4,5e-4`` -- every listed value (commas inside ``[]``/``()`` do not split).
- range: ``lr=1e-5:1e-3:log`` log-uniform float; ``model.dropout=0.1:0.5`` uniform float;
  ``epochs=5:20`` uniform int (both bounds written as integers; add ``:float`` to force floats,
  ``:int`` to force ints); ``batch_size=8:64:log`` log-uniform int; ``norm=a,b,c`` a uniform choice.
- set: ``epochs=3`` -- fixed for every trial.
- seeds: ``--seeds N`` -- every configuration is trained with the N training seeds ``S, S+1, ..., S+N-1``
  (``S``: ``--set seed=S`` if given, else the preset's ``train.seed``, 42), so ``--seeds 1`` is the plain
  ``r2 train`` run. The seed is the trial's last override (key ``seed``), varying fastest.

Trials that differ only in their training seed (``seed`` / ``train.seed``, from ``--seeds`` or listed in a
grid or range) are one *configuration*: the results report its mean, std and number of seeds.

Expansion: the grid is the Cartesian product of its lists (first key varies slowest). With ``--random N``
each of the N random draws is combined with every grid point (N x |grid| trials); without ranges the
grid alone is the sweep. Random draws use ``numpy.random.default_rng(seed)`` in trial order, then in
the order the ranges were given, so the same seed gives the same trials.

A spec file is JSON (``.json``) or TOML (``.toml``)::

    {"preset": "charades", "store": "cache/charades.zarr", "seed": 0, "seeds": 3,
     "set": {"epochs": 3},
     "grid": {"lr": [1e-4, 2.5e-4], "loss_sal": "0.05,0.1"},
     "random": {"n": 8, "ranges": {"model.dropout": "0.1:0.5", "wd": {"low": 1e-5, "high": 1e-3, "log": true},
                                   "norm": ["a", "b"]}}}
"""

from __future__ import annotations

import itertools
import json
import math
import tomllib
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from shards.errors import ConfigError

_FILE_KEYS = ("preset", "store", "seed", "seeds", "set", "grid", "random")
SEED_KEY = "seed"
"""Override key of the training seed in the trials of ``--seeds N``."""
SEED_KEYS = (SEED_KEY, "train.seed")
"""Override keys naming the training seed: trials that differ only in these are one configuration."""
_SAMPLE_DIGITS = 4
"""Significant digits kept from a random float draw (readable names, exact re-runs via the text)."""


class SweepSpecError(ConfigError):
    """A malformed ``--grid`` / ``--range`` / ``--set`` text or sweep spec file."""


@dataclass(frozen=True)
class ParamRange:
    """The distribution of one randomly searched parameter.

    Attributes:
        name: config key.
        kind: ``float``, ``int`` or ``choice``.
        low, high: inclusive bounds (``float``/``int`` kinds).
        log: sample uniformly in log space (bounds must be > 0).
        choices: value texts of a ``choice`` parameter.
    """

    name: str
    kind: str
    low: float = 0.0
    high: float = 0.0
    log: bool = False
    choices: tuple[str, ...] = ()

    def sample(self, rng: np.random.Generator) -> str:
        """Draw one value and return its text (floats rounded to 4 significant digits)."""
        if self.kind == "choice":
            return self.choices[int(rng.integers(len(self.choices)))]
        if self.kind == "int":
            if self.log:
                lo, hi = math.log(self.low), math.log(self.high + 1)
                return str(min(int(math.exp(rng.uniform(lo, hi))), int(self.high)))
            return str(int(rng.integers(int(self.low), int(self.high) + 1)))
        if self.log:
            value = math.exp(rng.uniform(math.log(self.low), math.log(self.high)))
        else:
            value = rng.uniform(self.low, self.high)
        return f"{float(f'{value:.{_SAMPLE_DIGITS}g}'):g}"


@dataclass
class SweepSpec:
    """A full sweep description (merged from a spec file and the command line).

    Attributes:
        preset: config preset name (``train.config.get_preset``).
        store: feature store path (may be ``None`` until the command line supplies it).
        grid: ``{key: [value text, ...]}`` in the order given.
        ranges: ``{key: ParamRange}`` in the order given.
        n_random: number of random draws (0: grid only).
        fixed: ``{key: value text}`` applied to every trial before its own overrides.
        seed: seed of the random draws (not the training seed; set that with ``--set seed=...``).
        n_seeds: training seeds per configuration (``--seeds N``; 0: the seed is not swept this way).
        seed_base: first training seed of ``--seeds`` (``None``: the preset's ``train.seed``).
    """

    preset: str | None = None
    store: str | None = None
    grid: dict[str, list[str]] = field(default_factory=dict)
    ranges: dict[str, ParamRange] = field(default_factory=dict)
    n_random: int = 0
    fixed: dict[str, str] = field(default_factory=dict)
    seed: int = 0
    n_seeds: int = 0
    seed_base: int | None = None

    def swept_keys(self) -> list[str]:
        """Keys that vary between trials: grid keys first, then range keys."""
        return list(self.grid) + [k for k in self.ranges if k not in self.grid]

    def config_keys(self) -> list[str]:
        """Swept keys that make configurations: :meth:`swept_keys` without the training seed."""
        return [k for k in self.swept_keys() if k not in SEED_KEYS]

    def seeded(self) -> bool:
        """Whether the training seed varies (``--seeds N`` or a seed key in the grid / ranges): the
        results then report configurations (mean, std, n over seeds) instead of single trials."""
        return self.n_seeds > 0 or len(self.config_keys()) < len(self.swept_keys())

    def log_keys(self) -> set[str]:
        """Keys searched on a log scale (their plots get a log x-axis)."""
        return {k for k, r in self.ranges.items() if r.log}


def split_values(text: str) -> list[str]:
    """Split ``a,b,[1,2]`` on the commas outside brackets; strips white space around each value."""
    parts: list[str] = []
    current: list[str] = []
    depth = 0
    for ch in text:
        if ch in "[(":
            depth += 1
        elif ch in "])":
            depth -= 1
        if ch == "," and depth == 0:
            parts.append("".join(current).strip())
            current = []
        else:
            current.append(ch)
    parts.append("".join(current).strip())
    return parts


def _split_assignment(text: str, option: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    key, value = key.strip(), value.strip()
    if not sep or not key or not value:
        raise SweepSpecError(f"{option} {text!r}: expected KEY=VALUE (e.g. {option} lr=1e-4)")
    return key, value


def parse_grid(text: str) -> tuple[str, list[str]]:
    """``'lr=1e-4,2.5e-4'`` -> ``('lr', ['1e-4', '2.5e-4'])``; duplicate or empty values are errors."""
    key, value = _split_assignment(text, "--grid")
    values = split_values(value)
    if any(not v for v in values):
        raise SweepSpecError(f"--grid {text!r}: empty value in the list")
    if len(set(values)) != len(values):
        raise SweepSpecError(f"--grid {text!r}: a value is listed twice")
    return key, values


def parse_set(text: str) -> tuple[str, str]:
    """``'epochs=3'`` -> ``('epochs', '3')``."""
    return _split_assignment(text, "--set")


def _is_int_literal(text: str) -> bool:
    try:
        int(text)
    except ValueError:
        return False
    return True


def _number(text: str, where: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise SweepSpecError(f"{where}: {text!r} is not a number") from None
    if not math.isfinite(value):
        raise SweepSpecError(f"{where}: bound {text!r} must be finite")
    return value


def make_range(
    name: str, low: float, high: float, *, log: bool = False, integer: bool = False, where: str = "--range"
) -> ParamRange:
    """Validate bounds and build a numeric :class:`ParamRange`."""
    if low > high:
        raise SweepSpecError(f"{where}: low bound {low:g} is above high bound {high:g}")
    if log and low <= 0:
        raise SweepSpecError(f"{where}: a log range needs bounds > 0 (got {low:g})")
    if integer and (low != int(low) or high != int(high)):
        raise SweepSpecError(f"{where}: an int range needs integer bounds (got {low:g}:{high:g})")
    return ParamRange(name=name, kind="int" if integer else "float", low=low, high=high, log=log)


def parse_range(text: str) -> ParamRange:
    """Parse ``KEY=LOW:HIGH[:log][:int|:float]`` or ``KEY=a,b,c`` (choices); see the module docstring."""
    key, value = _split_assignment(text, "--range")
    where = f"--range {text!r}"
    if ":" not in value:
        choices = split_values(value)
        if len(choices) < 2 or any(not c for c in choices):
            raise SweepSpecError(f"{where}: expected LOW:HIGH[:log] or at least two choices a,b")
        return ParamRange(name=key, kind="choice", choices=tuple(choices))
    parts = [p.strip() for p in value.split(":")]
    if len(parts) < 2:
        raise SweepSpecError(f"{where}: expected LOW:HIGH[:log][:int|:float]")
    flags = parts[2:]
    unknown = [f for f in flags if f not in ("log", "int", "float")]
    if unknown or ("int" in flags and "float" in flags):
        raise SweepSpecError(f"{where}: unknown modifier {unknown or flags}; use log, int or float")
    low, high = _number(parts[0], where), _number(parts[1], where)
    int_bounds = _is_int_literal(parts[0]) and _is_int_literal(parts[1])
    integer = "int" in flags or ("float" not in flags and int_bounds)
    return make_range(key, low, high, log="log" in flags, integer=integer, where=where)


def value_text(value: Any) -> str:
    """Text of a spec-file value as passed to ``--set``: JSON for bools/lists/null, ``repr`` for floats."""
    if isinstance(value, str):
        return value
    if isinstance(value, float):
        return repr(value)
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    return json.dumps(value)


def _file_range(name: str, value: Any, where: str) -> ParamRange:
    if isinstance(value, str):
        return parse_range(f"{name}={value}")
    if isinstance(value, list):
        if len(value) < 2:
            raise SweepSpecError(f"{where}: choices of {name!r} need at least two values")
        return ParamRange(name=name, kind="choice", choices=tuple(value_text(v) for v in value))
    if isinstance(value, dict):
        unknown = set(value) - {"low", "high", "log", "int"}
        if unknown or not {"low", "high"} <= set(value):
            raise SweepSpecError(f"{where}: range {name!r} needs keys low, high (optional log, int)")
        low, high = _number(str(value["low"]), where), _number(str(value["high"]), where)
        integer = bool(value.get("int", isinstance(value["low"], int) and isinstance(value["high"], int)))
        return make_range(name, low, high, log=bool(value.get("log", False)), integer=integer, where=where)
    raise SweepSpecError(f"{where}: range {name!r} must be a string, a list of choices or a table")


def _count(value: Any, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise SweepSpecError(f"{where}: {value!r} must be a number of seeds (explicit seeds go in the grid: "
                             '"grid": {"seed": [1, 2, 3]})')
    return value


def load_spec_file(path: str | Path) -> SweepSpec:
    """Read a JSON or TOML sweep spec (see the module docstring for the schema)."""
    path = Path(path)
    if not path.is_file():
        raise SweepSpecError(f"sweep spec {path}: file not found")
    text = path.read_text(encoding="utf-8")
    try:
        if path.suffix == ".toml":
            data = tomllib.loads(text)
        elif path.suffix == ".json":
            data = json.loads(text)
        else:
            raise SweepSpecError(f"sweep spec {path}: use a .json or .toml file")
    except (json.JSONDecodeError, ValueError) as err:
        raise SweepSpecError(f"sweep spec {path}: not valid {path.suffix[1:].upper()}: {err}") from None
    where = f"sweep spec {path}"
    if not isinstance(data, dict):
        raise SweepSpecError(f"{where}: the top level must be an object/table")
    unknown = set(data) - set(_FILE_KEYS)
    if unknown:
        raise SweepSpecError(f"{where}: unknown key(s) {sorted(unknown)}; valid: {', '.join(_FILE_KEYS)}")
    spec = SweepSpec(preset=data.get("preset"), store=data.get("store"), seed=int(data.get("seed", 0)),
                     n_seeds=_count(data.get("seeds", 0), f"{where}: 'seeds'"))
    for key, value in dict(data.get("set", {})).items():
        spec.fixed[key] = value_text(value)
    for key, value in dict(data.get("grid", {})).items():
        values = split_values(value) if isinstance(value, str) else [value_text(v) for v in value]
        if not values or len(set(values)) != len(values):
            raise SweepSpecError(f"{where}: grid {key!r} needs distinct values")
        spec.grid[key] = values
    random_part = data.get("random", {})
    if not isinstance(random_part, dict) or set(random_part) - {"n", "ranges"}:
        raise SweepSpecError(f"{where}: 'random' must be a table with keys n and ranges")
    spec.n_random = int(random_part.get("n", 0))
    for key, value in dict(random_part.get("ranges", {})).items():
        spec.ranges[key] = _file_range(key, value, where)
    return spec


def build_spec(
    *,
    spec_file: str | Path | None = None,
    preset: str | None = None,
    store: str | None = None,
    grid: Sequence[str] = (),
    ranges: Sequence[str] = (),
    n_random: int | None = None,
    fixed: Sequence[str] = (),
    seed: int | None = None,
    seeds: int | None = None,
) -> SweepSpec:
    """Merge a spec file (if any) with command-line texts; command-line values win, key by key.

    With ``seeds`` (or ``seeds`` in the file) a fixed training seed (``--set seed=S``) becomes the first
    of the ``seeds`` seeds (:attr:`SweepSpec.seed_base`) instead of an override.
    """
    spec = load_spec_file(spec_file) if spec_file else SweepSpec()
    spec.preset = preset or spec.preset
    spec.store = store or spec.store
    spec.seed = spec.seed if seed is None else seed
    spec.n_random = spec.n_random if n_random is None else n_random
    spec.n_seeds = spec.n_seeds if seeds is None else seeds
    for text in fixed:
        key, value = parse_set(text)
        spec.fixed[key] = value
    for text in grid:
        key, values = parse_grid(text)
        spec.grid[key] = values
    for text in ranges:
        rng = parse_range(text)
        spec.ranges[rng.name] = rng
    validate_spec(spec)
    if spec.n_seeds:
        for key in [k for k in SEED_KEYS if k in spec.fixed]:
            text = spec.fixed.pop(key)
            if not _is_int_literal(text):
                raise SweepSpecError(f"--set {key}={text}: a training seed is a whole number")
            spec.seed_base = int(text)
    return spec


def validate_spec(spec: SweepSpec) -> None:
    """Raise :class:`SweepSpecError` for a spec that cannot be expanded into trials."""
    if not spec.preset:
        raise SweepSpecError("no preset: give --preset NAME (or 'preset' in the spec file)")
    both = set(spec.grid) & set(spec.ranges)
    if both:
        raise SweepSpecError(f"{sorted(both)} given both as --grid and --range; keep one")
    swept_and_fixed = set(spec.swept_keys()) & set(spec.fixed)
    if swept_and_fixed:
        raise SweepSpecError(f"{sorted(swept_and_fixed)} given both as --set and as swept; keep one")
    if spec.n_random < 0:
        raise SweepSpecError(f"--random {spec.n_random}: must be >= 0")
    if spec.ranges and spec.n_random == 0:
        raise SweepSpecError("--range given without --random N: say how many random trials to draw")
    if spec.n_random and not spec.ranges:
        raise SweepSpecError(f"--random {spec.n_random} given without any --range KEY=LOW:HIGH")
    if spec.n_seeds < 0:
        raise SweepSpecError(f"--seeds {spec.n_seeds}: must be >= 1 (or 0: no seed sweep)")
    swept_seeds = [k for k in spec.swept_keys() if k in SEED_KEYS]
    if spec.n_seeds and swept_seeds:
        raise SweepSpecError(f"--seeds {spec.n_seeds} and {swept_seeds[0]} in --grid/--range both set the "
                             "training seeds; keep one")
    if len([k for k in SEED_KEYS if k in spec.fixed]) > 1:
        raise SweepSpecError(f"--set gives the training seed twice ({' and '.join(SEED_KEYS)}); keep one")
    if not spec.grid and not spec.ranges and not spec.n_seeds:
        raise SweepSpecError("nothing to sweep: give --grid KEY=V1,V2 and/or --random N with --range ... "
                             "and/or --seeds N")


def seed_values(spec: SweepSpec) -> list[str]:
    """The training seeds of ``--seeds N`` as override texts: ``base, base+1, ..., base+N-1`` with
    ``base`` = :attr:`SweepSpec.seed_base`, else the preset's ``train.seed``; ``[]`` without ``--seeds``."""
    if not spec.n_seeds:
        return []
    base = spec.seed_base
    if base is None:
        from train.config import get_preset

        base = get_preset(spec.preset or "").train.seed
    return [str(base + i) for i in range(spec.n_seeds)]


def config_params(params: dict[str, str]) -> dict[str, str]:
    """A trial's swept overrides without the training seed: what names its configuration."""
    return {k: v for k, v in params.items() if k not in SEED_KEYS}


def seed_of(params: dict[str, str]) -> str | None:
    """The training seed among a trial's swept overrides (text), or ``None`` when it is not swept."""
    return next((params[k] for k in SEED_KEYS if k in params), None)


def expand(spec: SweepSpec) -> list[dict[str, str]]:
    """All trials of ``spec`` as override dicts (swept keys only), in a deterministic order; with
    ``--seeds N`` each configuration's N trials follow one another (``seed`` last, varying fastest)."""
    combos = itertools.product(*spec.grid.values())
    trials = [dict(zip(spec.grid, combo, strict=True)) for combo in combos]
    if spec.ranges:
        rng = np.random.default_rng(spec.seed)
        grid_points, trials = trials, []
        for _ in range(spec.n_random):
            draw = {name: r.sample(rng) for name, r in spec.ranges.items()}
            trials.extend({**point, **draw} for point in grid_points)
    seeds = seed_values(spec)
    if not seeds:
        return trials
    return [{**trial, SEED_KEY: seed} for trial in trials for seed in seeds]
