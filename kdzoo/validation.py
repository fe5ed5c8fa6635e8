"""Range checks of hyper-parameters, written once.

Each check takes the values as keyword arguments, named as the config names them
(``check_positive(temperature=temperature)``), and raises :class:`~kdzoo.errors.ConfigError`
naming the first value out of range: ``"temperature must be > 0, got 0"``. ``None`` passes every
check (an optional value left unset). Choices need no check here: a ``Literal[...]`` in the
signature is the schema LightningCLI enforces.
"""

from __future__ import annotations

from kdzoo.errors import ConfigError

__all__ = ["check_at_least", "check_fraction", "check_non_negative", "check_positive"]


def check_positive(**values: float | None) -> None:
    """Every value is ``> 0``: temperatures, learning rates, multipliers."""
    for name, value in values.items():
        if value is not None and not value > 0:
            raise ConfigError(f"{name} must be > 0, got {value}")


def check_non_negative(**values: float | None) -> None:
    """Every value is ``>= 0``: loss weights, warm-up lengths, momenta of a running sum."""
    check_at_least(0, **values)


def check_at_least(minimum: int, /, **values: float | None) -> None:
    """Every value is ``>= minimum``: counts (``check_at_least(1, num_aug=num_aug)``)."""
    for name, value in values.items():
        if value is not None and not value >= minimum:
            raise ConfigError(f"{name} must be >= {minimum}, got {value}")


def check_fraction(*, below_one: bool = False, **values: float | None) -> None:
    """Every value is in ``[0, 1]`` (probabilities, EMA momenta), or in ``[0, 1)`` with
    ``below_one`` (a label-smoothing factor of 1 leaves no label)."""
    for name, value in values.items():
        if value is None:
            continue
        if below_one and not 0.0 <= value < 1.0:
            raise ConfigError(f"{name} must be in [0, 1), got {value}")
        if not 0.0 <= value <= 1.0:
            raise ConfigError(f"{name} must be in [0, 1], got {value}")
