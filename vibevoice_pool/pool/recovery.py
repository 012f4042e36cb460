"""The recovery policy: what a slot does when its worker dies, fails to boot,
or stops showing signs of life. Pure: every rule takes (record, now, settings)
and returns what to do, so a test drives it with a fake clock, and the local
supervisor and the Ray backend both act on the same answers.

    on_start(record, now)            -> record (a worker is on its way up)
    on_ready(record, now)            -> record (it loaded its engine)
    on_death(record, now, cause)     -> Action: respawn at, fail, unavailable, stop
    on_boot_failure(record, now)     -> Action: respawn at, or fail (halt)
    on_tick(record, now, vitals)     -> Kill or None (hang, stall, slow boot, lost device)
    on_retry(record)                 -> record (an operator retries a failed slot)
    quarantined(lost)                -> a request that took down this many workers
                                        is answered worker_lost, never retried

The backoff: a first death respawns at once; deaths in a row (a failed boot is
one) wait 1, 2, 4, 8, 16, then `backoff_cap_s`; the count starts over when the
worker that died had been ready for `healthy_reset_s`. A crash loop backs off,
a worker killed now and then comes back at once every time. After
`boot_failures_to_fail` failed boots in a row the slot halts (`failed`) and is
retried every `failed_retry_s` (gunicorn's arbiter halts on a boot error too).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, replace

HEALTHY_RESET_S = 10.0  # a worker ready this long before it died starts the backoff over
BOOT_FAILURES_TO_FAIL = 3
BACKOFF_CAP_S = 30.0


class Cause(enum.Enum):
    """Why a worker went away, as far as recovery cares."""

    CRASH = "crash"  # it died, or was killed for a hang or a stall
    RESTART = "restart requested"  # an operator asked: comes back at once
    DEVICE_LOST = "device lost"  # its GPU stopped answering
    REMOVED = "removed"  # taken out of the pool for good
    SHUTDOWN = "shutdown"  # the pool is stopping


class Verdict(enum.Enum):
    RESPAWN = "respawn"  # start a new worker at `at`
    FAIL = "failed"  # halt: too many failed boots; try again at `at`
    UNAVAILABLE = "unavailable"  # the device is gone; look again at `at`
    STOP = "stop"  # never again


class KillKind(enum.Enum):
    HANG = "hang"
    STALL = "stall"
    BOOT_TIMEOUT = "boot timeout"  # counts as a failed boot
    DEVICE_LOST = "device lost"


@dataclass(frozen=True)
class Record:
    """What recovery knows of one slot."""

    deaths: int = 0  # in a row, failed boots included: the backoff index
    boot_failures: int = 0  # in a row
    started_at: float = 0.0  # when its current worker was started
    ready_since: float | None = None  # None while the worker boots (or is down)
    restarts: int = 0


@dataclass(frozen=True)
class Action:
    verdict: Verdict
    at: float  # when to start again (RESPAWN, FAIL, UNAVAILABLE)
    record: Record  # the slot's record after this event


@dataclass(frozen=True)
class Vitals:
    """Signs of life a backend can see; None where it cannot (the rule is skipped)."""

    heartbeat_age: float | None = None  # since the worker's last beat
    progress_age: float | None = None  # since its last step, while it has rows
    unhealthy_for: float | None = None  # since its device stopped answering


@dataclass(frozen=True)
class Kill:
    kind: KillKind
    reason: str


@dataclass(frozen=True)
class RecoveryPolicy:
    """The settings recovery runs by; each method is a pure rule over a Record."""

    backoff_cap_s: float = BACKOFF_CAP_S
    healthy_reset_s: float = HEALTHY_RESET_S
    boot_failures_to_fail: int = BOOT_FAILURES_TO_FAIL
    failed_retry_s: float = 30.0
    hang_timeout_s: float = 30.0
    stall_timeout_s: float = 300.0
    boot_timeout_s: float = 600.0
    device_lost_s: float = 3.0
    max_attempts: int = 2

    @classmethod
    def from_config(cls, cfg) -> RecoveryPolicy:
        names = [f for f in cls.__dataclass_fields__ if hasattr(cfg, f)]
        return cls(**{f: getattr(cfg, f) for f in names})

    def backoff(self, deaths: int) -> float:
        """Seconds before the next start after `deaths` deaths in a row (0 for the first)."""
        if deaths <= 0:
            return 0.0
        return float(min(2 ** (deaths - 1), self.backoff_cap_s))

    # ---- events --------------------------------------------------------

    def on_start(self, record: Record, now: float) -> Record:
        return replace(record, started_at=now, ready_since=None)

    def on_ready(self, record: Record, now: float) -> Record:
        return replace(record, ready_since=now, boot_failures=0)

    def on_retry(self, record: Record) -> Record:
        """An operator asked for a slot that is down to be tried again now."""
        return replace(record, boot_failures=0)

    def on_death(self, record: Record, now: float, cause: Cause = Cause.CRASH) -> Action:
        if cause in (Cause.REMOVED, Cause.SHUTDOWN):
            return Action(Verdict.STOP, now, replace(record, ready_since=None))
        if cause is Cause.DEVICE_LOST:
            down = replace(record, ready_since=None)
            return Action(Verdict.UNAVAILABLE, now + self.failed_retry_s, down)
        if record.ready_since is None and cause is Cause.CRASH:
            return self.on_boot_failure(record, now)
        deaths = record.deaths
        if record.ready_since is not None and now - record.ready_since >= self.healthy_reset_s:
            deaths = 0  # it had been healthy long enough: the backoff starts over
        delay = 0.0 if cause is Cause.RESTART else self.backoff(deaths)
        after = replace(record, deaths=deaths + 1, ready_since=None)
        return Action(Verdict.RESPAWN, now + delay, after)

    def on_boot_failure(self, record: Record, now: float) -> Action:
        failures = record.boot_failures + 1
        if failures >= self.boot_failures_to_fail:
            after = replace(record, boot_failures=failures, ready_since=None)
            return Action(Verdict.FAIL, now + self.failed_retry_s, after)
        after = replace(record, boot_failures=failures, deaths=record.deaths + 1, ready_since=None)
        return Action(Verdict.RESPAWN, now + self.backoff(record.deaths), after)

    def on_tick(self, record: Record, now: float, vitals: Vitals) -> Kill | None:
        """The hang rule and its kin: a worker to kill now, or None."""
        v = vitals
        if v.heartbeat_age is not None and v.heartbeat_age > self.hang_timeout_s:
            return Kill(KillKind.HANG, f"hung: no heartbeat for {v.heartbeat_age:.1f} s")
        if v.progress_age is not None and v.progress_age > self.stall_timeout_s:
            why = f"stalled: no generation step for {self.stall_timeout_s:g} s"
            return Kill(KillKind.STALL, why)
        if record.ready_since is None and now - record.started_at > self.boot_timeout_s:
            why = f"not ready after boot_timeout_s={self.boot_timeout_s:g}"
            return Kill(KillKind.BOOT_TIMEOUT, why)
        if v.unhealthy_for is not None and v.unhealthy_for >= self.device_lost_s:
            why = f"device lost: NVML has not answered for {self.device_lost_s:g} s"
            return Kill(KillKind.DEVICE_LOST, why)
        return None

    def quarantined(self, lost: int) -> bool:
        """A request that was running on `lost` workers that died is not retried again."""
        return lost >= self.max_attempts
