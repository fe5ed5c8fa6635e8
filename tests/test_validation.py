"""The shared range checks: the message names the argument and its value, ``None`` passes."""

from __future__ import annotations

import math

import pytest

from kdzoo.errors import ConfigError
from kdzoo.validation import check_at_least, check_fraction, check_non_negative, check_positive


@pytest.mark.parametrize(
    ("check", "values", "message"),
    [
        (check_positive, {"temperature": 0}, "temperature must be > 0, got 0"),
        (check_positive, {"temperature": math.nan}, "temperature must be > 0, got nan"),
        (check_non_negative, {"ce_weight": 1.0, "kd_weight": -1.0}, "kd_weight must be >= 0"),
        (check_fraction, {"alpha": 1.5}, r"alpha must be in \[0, 1\], got 1.5"),
        (check_fraction, {"alpha": -0.1}, r"alpha must be in \[0, 1\], got -0.1"),
    ],
)
def test_out_of_range_values_are_named(check, values, message) -> None:
    with pytest.raises(ConfigError, match=message):
        check(**values)


def test_bounds_are_inclusive_where_stated() -> None:
    check_non_negative(kd_weight=0.0)
    check_fraction(momentum=0.0, rst=1.0)
    check_at_least(1, num_aug=1)
    with pytest.raises(ConfigError, match="num_aug must be >= 1, got 0"):
        check_at_least(1, num_aug=0)
    check_fraction(label_smoothing=0.0, below_one=True)
    with pytest.raises(ConfigError, match=r"label_smoothing must be in \[0, 1\), got 1.0"):
        check_fraction(label_smoothing=1.0, below_one=True)


def test_none_is_an_unset_optional_value() -> None:
    check_positive(fusion_lr=None)
    check_at_least(1, top_k=None)
    check_non_negative(weight=None)
    check_fraction(momentum=None)
