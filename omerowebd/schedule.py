"""The sweep schedule: an interval ("6h", "30m", "1d", "90s") or a daily time ("03:30")."""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import datetime, timedelta

_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


@dataclass(frozen=True)
class Schedule:
    interval: float | None = None  # seconds between sweeps
    daily: tuple[int, int] | None = None  # (hour, minute), local time

    def next_after(self, now: datetime) -> datetime:
        if self.interval is not None:
            return now + timedelta(seconds=self.interval)
        assert self.daily is not None
        hour, minute = self.daily
        at = now.replace(hour=hour, minute=minute, second=0, microsecond=0)
        return at if at > now else at + timedelta(days=1)


# Longer than this is surely a typo; and far longer overflows the date arithmetic
# of the next sweep ("999999999999d"), which must fail here, at check time.
MAX_INTERVAL = 366 * 86400


def parse_schedule(text: str) -> Schedule:
    m = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([smhd])\s*", text)
    if m:
        seconds = float(m.group(1)) * _UNITS[m.group(2)]
        if seconds <= 0:
            raise ValueError(f"must be a positive interval, not {text!r}")
        if seconds > MAX_INTERVAL:
            raise ValueError(f"must be an interval of at most 366d, not {text!r}")
        return Schedule(interval=seconds)
    m = re.fullmatch(r"\s*([01]?[0-9]|2[0-3]):([0-5][0-9])\s*", text)
    if m:
        return Schedule(daily=(int(m.group(1)), int(m.group(2))))
    raise ValueError(f'must be an interval such as "6h", "30m", "1d" or a daily time such as "03:30", not {text!r}')
