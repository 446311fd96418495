"""The one duration grammar: `90s`, `30m`, `9h`, `1d`, `2w`, combinations (`1h30m`, `1d2h`),
decimals (`1.5h`) or a number of seconds (a number, not a string: a
bare "3600" is a Unix time to `cost --since`).  Used by config (`hold`), the CLI
(`load --hold`, `cost --since`) and the HTTP API (`/v1/cost?since=`)."""

from __future__ import annotations

import math
import re

_DURATION = re.compile(
    r"^(?:(?P<w>\d+(?:\.\d+)?)w)?(?:(?P<d>\d+(?:\.\d+)?)d)?(?:(?P<h>\d+(?:\.\d+)?)h)?"
    r"(?:(?P<m>\d+(?:\.\d+)?)m)?(?:(?P<s>\d+(?:\.\d+)?)s)?$"
)
_UNIT_S = {"w": 7 * 86400.0, "d": 86400.0, "h": 3600.0, "m": 60.0, "s": 1.0}
FORMS = '"9h", "30m", "90s", "1h30m", "2w" or seconds as a number'


def parse_duration(value: object) -> float:
    """Seconds (> 0, finite) from a duration.  Raises ValueError naming the accepted forms."""
    if isinstance(value, int | float) and not isinstance(value, bool):
        seconds = float(value)
    elif isinstance(value, str) and (m := _DURATION.match(value.strip().lower())) and any(
        m.groupdict().values()
    ):
        seconds = sum(float(v) * _UNIT_S[k] for k, v in m.groupdict().items() if v)
    else:
        raise ValueError(f"must be a duration like {FORMS}, got {value!r}")
    if not (seconds > 0 and math.isfinite(seconds)):
        raise ValueError(f"must be a positive duration (finite), got {value!r}")
    return seconds


def is_duration(text: str) -> bool:
    """True when `text` has a unit (`30m`, `1h30m`): a plain number is not a duration here."""
    m = _DURATION.match(text.strip().lower())
    return bool(m and any(m.groupdict().values()))
