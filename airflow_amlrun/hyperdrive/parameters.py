"""Parameter expressions and sampling methods of a sweep, with the names the system it follows uses.

Each expression says what values a parameter takes; a sampling method draws the next set. Random and
Bayesian sampling ask Optuna (its RandomSampler and TPESampler, seeded): every expression maps to one of
Optuna's distributions plus a transform of the value drawn (``normal`` draws a quantile and maps it through
the normal distribution's inverse, ``quniform`` rounds to its step), so TPE learns on the same scale as the
random search draws. Grid sampling walks the product of ``choice`` lists in order.
"""

from __future__ import annotations

import itertools
import math
import statistics
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from airflow_amlrun.errors import ConfigurationError, shown

_SCALARS = (str, int, float, bool)


@dataclass(frozen=True)
class Expression:
    """The values one parameter takes: build it with ``choice``, ``randint``, ``uniform``, ``quniform``,
    ``loguniform``, ``qloguniform`` or ``normal``."""

    kind: str
    args: tuple[Any, ...]

    def distribution(self) -> Any:
        """The Optuna distribution this expression draws from (before ``value``)."""
        from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

        a = self.args
        if self.kind == "choice":
            return CategoricalDistribution(list(a))
        if self.kind == "randint":
            return IntDistribution(0, a[0] - 1)
        if self.kind in ("uniform", "quniform"):
            return FloatDistribution(a[0], a[1])
        if self.kind in ("loguniform", "qloguniform"):
            return FloatDistribution(math.exp(a[0]), math.exp(a[1]), log=True)
        # normal: a quantile, mapped through the inverse of the normal distribution.
        return FloatDistribution(1e-9, 1 - 1e-9)

    def value(self, drawn: Any) -> Any:
        """The parameter's value for what was drawn from ``distribution``."""
        a = self.args
        if self.kind in ("quniform", "qloguniform"):
            return _rounded(round(drawn / a[2]) * a[2], a[2])
        if self.kind == "normal":
            return statistics.NormalDist(a[0], a[1]).inv_cdf(drawn)
        return drawn

    def drawn(self, value: Any) -> Any:
        """What ``distribution`` gave for a parameter's value (the inverse of ``value``, up to rounding)."""
        if self.kind == "normal":
            quantile = statistics.NormalDist(*self.args).cdf(float(value))
            return min(max(quantile, 1e-9), 1 - 1e-9)
        return value


def _rounded(value: float, q: float) -> float | int:
    """A multiple of q without float noise (0.30000000000000004 -> 0.3), an int when q is whole."""
    if float(q).is_integer():
        return int(value)
    decimals = max(0, -math.floor(math.log10(abs(q)))) + 6
    return round(value, decimals)


def _number(value: object, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ConfigurationError(f"{what} must be a finite number, not {shown(value)}.")
    return float(value)


def choice(*options: Any) -> Expression:
    """One of the given values (``choice(0.1, 1, 10)`` or ``choice([0.1, 1, 10])``)."""
    values = (
        list(options[0])
        if len(options) == 1 and isinstance(options[0], list | tuple | range)
        else list(options)
    )
    if not values:
        raise ConfigurationError("choice() needs at least one value, e.g. choice(0.1, 1, 10).")
    for value in values:
        if not isinstance(value, _SCALARS):
            raise ConfigurationError(
                f"choice value {shown(value)} must be a string, number or boolean: it becomes a script argument."
            )
    return Expression("choice", tuple(values))


def randint(upper: int) -> Expression:
    """An integer in [0, upper)."""
    if isinstance(upper, bool) or not isinstance(upper, int) or upper < 1:
        raise ConfigurationError(f"randint(upper) needs a whole number upper >= 1, not {shown(upper)}.")
    return Expression("randint", (upper,))


def uniform(min_value: float, max_value: float) -> Expression:
    """A number uniformly in [min_value, max_value]."""
    low, high = _bounds("uniform", min_value, max_value)
    return Expression("uniform", (low, high))


def quniform(min_value: float, max_value: float, q: float) -> Expression:
    """``round(uniform(min_value, max_value) / q) * q``."""
    low, high = _bounds("quniform", min_value, max_value)
    return Expression("quniform", (low, high, _step("quniform", q)))


def loguniform(min_value: float, max_value: float) -> Expression:
    """``exp(uniform(min_value, max_value))``: the bounds are exponents, as in the system this follows."""
    low, high = _bounds("loguniform", min_value, max_value)
    return Expression("loguniform", (low, high))


def qloguniform(min_value: float, max_value: float, q: float) -> Expression:
    """``round(exp(uniform(min_value, max_value)) / q) * q``."""
    low, high = _bounds("qloguniform", min_value, max_value)
    return Expression("qloguniform", (low, high, _step("qloguniform", q)))


def normal(mu: float, sigma: float) -> Expression:
    """A number from the normal distribution of mean mu and standard deviation sigma."""
    mean = _number(mu, "normal(mu, sigma): mu")
    spread = _number(sigma, "normal(mu, sigma): sigma")
    if spread <= 0:
        raise ConfigurationError(f"normal(mu, sigma): sigma must be > 0, not {sigma!r}.")
    return Expression("normal", (mean, spread))


def _bounds(name: str, low: object, high: object) -> tuple[float, float]:
    a, b = _number(low, f"{name}: min_value"), _number(high, f"{name}: max_value")
    if not a < b:
        raise ConfigurationError(
            f"{name}(min_value, max_value) needs min_value < max_value, not {low!r}, {high!r}."
        )
    if name.endswith("loguniform") and not (a > -700 and b < 700):
        raise ConfigurationError(
            f"{name}(min_value, max_value): the bounds are exponents between -700 and 700 (exp of them must be a "
            f"positive float), not {low!r}, {high!r}."
        )
    return a, b


def _step(name: str, q: object) -> float:
    step = _number(q, f"{name}: q")
    if step <= 0:
        raise ConfigurationError(f"{name}: q must be > 0, not {q!r}.")
    return step


def _space(space: object, method: str) -> dict[str, Expression]:
    if not isinstance(space, Mapping) or not space:
        raise ConfigurationError(
            f"{method} needs a parameter space: a mapping of argument names to expressions, such as "
            "{'--alpha': choice(0.1, 1, 10)}."
        )
    checked: dict[str, Expression] = {}
    flags: dict[str, str] = {}
    for name, expression in space.items():
        if not isinstance(name, str) or not name.strip("-") or any(c.isspace() for c in name):
            raise ConfigurationError(
                f"{method}: parameter name {shown(name)} must be a word such as '--alpha'."
            )
        if not isinstance(expression, Expression):
            raise ConfigurationError(
                f"{method}: parameter {name!r} = {shown(expression)} must be an expression such as choice(1, 2) "
                "or uniform(0, 1) (from airflow_amlrun.hyperdrive)."
            )
        flag = name if name.startswith("-") else f"--{name}"
        if flag in flags:
            raise ConfigurationError(f"{method}: {flags[flag]!r} and {name!r} are the same argument {flag}.")
        flags[flag] = name
        checked[name] = expression
    return checked


class ParameterSampling:
    """How a sweep chooses the parameters of its next run."""

    name = "Sampling"

    def __init__(self, parameter_space: Mapping[str, Expression]) -> None:
        self.parameter_space = _space(parameter_space, type(self).__name__)

    def size(self) -> int | None:
        """How many distinct sets there are, when finite (a grid)."""
        return None

    def sampler(self) -> Any:
        """The Optuna sampler drawing the sets (None for a grid)."""
        return None

    def to_dict(self) -> dict[str, Any]:
        return {
            "method": self.name,
            "parameter_space": {
                k: {"kind": e.kind, "args": list(e.args)} for k, e in self.parameter_space.items()
            },
        }


class GridParameterSampling(ParameterSampling):
    """Every combination of ``choice`` values, in order (the last parameter varying fastest)."""

    name = "grid"

    def __init__(self, parameter_space: Mapping[str, Expression]) -> None:
        super().__init__(parameter_space)
        for name, expression in self.parameter_space.items():
            if expression.kind != "choice":
                raise ConfigurationError(
                    f"GridParameterSampling takes choice() expressions only; {name!r} is {expression.kind}(). Use "
                    "RandomParameterSampling for ranges."
                )

    def size(self) -> int:
        return math.prod(len(e.args) for e in self.parameter_space.values())

    def grid(self) -> Iterator[dict[str, Any]]:
        names = list(self.parameter_space)
        for values in itertools.product(*(self.parameter_space[n].args for n in names)):
            yield dict(zip(names, values, strict=True))


class RandomParameterSampling(ParameterSampling):
    """Independent random draws from every expression; ``seed`` makes a sweep's sets the same each time."""

    name = "random"

    def __init__(self, parameter_space: Mapping[str, Expression], seed: int | None = None) -> None:
        super().__init__(parameter_space)
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
            raise ConfigurationError(f"seed must be a whole number or None, not {shown(seed)}.")
        self.seed = seed

    def sampler(self) -> Any:
        from optuna.samplers import RandomSampler

        return RandomSampler(seed=self.seed)

    def to_dict(self) -> dict[str, Any]:
        return {**super().to_dict(), "seed": self.seed}


class BayesianParameterSampling(RandomParameterSampling):
    """Draws guided by the runs so far (Optuna's tree-structured Parzen estimator), seeded."""

    name = "bayesian"

    def sampler(self) -> Any:
        from optuna.samplers import TPESampler

        # Runs go on concurrently: a pending run counts as its worst, so the next draws look elsewhere.
        return TPESampler(seed=self.seed, n_startup_trials=3, constant_liar=True)


def argument_words(name: str, value: Any) -> list[str]:
    """The script arguments of one parameter: ``--alpha 0.1`` (a bare name gets ``--``)."""
    flag = name if name.startswith("-") else f"--{name}"
    text = str(value)
    # A value that starts with '-' would read as a flag of its own: it goes in the flag's word.
    return [f"{flag}={text}"] if text.startswith("-") else [flag, text]
