"""The recovery policy on its own, with a fake clock: the backoff schedule, the
healthy reset, quarantine, the halt after failed boots, the hang rule."""

from __future__ import annotations

from vibevoice_pool.pool.recovery import (
    Cause,
    KillKind,
    Record,
    RecoveryPolicy,
    Verdict,
    Vitals,
)

POLICY = RecoveryPolicy(
    backoff_cap_s=30.0,
    healthy_reset_s=10.0,
    boot_failures_to_fail=3,
    failed_retry_s=30.0,
    hang_timeout_s=5.0,
    stall_timeout_s=20.0,
    boot_timeout_s=60.0,
    device_lost_s=3.0,
    max_attempts=2,
)


class Clock:
    def __init__(self, now: float = 1000.0):
        self.now = now

    def advance(self, s: float) -> float:
        self.now += s
        return self.now


def booted(policy, record, clock, after_s=0.5):
    """Start a worker on the record and let it become ready after `after_s`."""
    record = policy.on_start(record, clock.now)
    return policy.on_ready(record, clock.advance(after_s))


def test_the_backoff_schedule_starts_at_once_and_caps():
    clock, record, waits = Clock(), Record(), []
    for _ in range(9):
        record = booted(POLICY, record, clock)
        action = POLICY.on_death(record, clock.advance(1.0))  # dies 1 s after ready
        assert action.verdict is Verdict.RESPAWN
        waits.append(action.at - clock.now)
        record = action.record
        clock.now = action.at
    assert waits == [0, 1, 2, 4, 8, 16, 30, 30, 30]


def test_a_smaller_cap_is_the_setting_not_a_constant():
    policy = RecoveryPolicy(backoff_cap_s=3.0)
    assert [policy.backoff(d) for d in range(6)] == [0, 1, 2, 3, 3, 3]


def test_a_worker_healthy_long_enough_starts_the_backoff_over():
    clock, record = Clock(), Record()
    for _ in range(4):  # a crash loop: 0, 1, 2, 4 s
        record = booted(POLICY, record, clock)
        action = POLICY.on_death(record, clock.advance(1.0))
        record, clock.now = action.record, action.at
    record = booted(POLICY, record, clock)
    short = POLICY.on_death(record, clock.advance(POLICY.healthy_reset_s - 0.5))
    assert short.at - clock.now == 8  # not healthy long enough: the loop goes on
    clock.now = short.at
    record = booted(POLICY, short.record, clock)
    long = POLICY.on_death(record, clock.advance(POLICY.healthy_reset_s))
    assert long.verdict is Verdict.RESPAWN and long.at == clock.now  # at once again
    assert long.record.deaths == 1


def test_an_operator_restart_comes_back_at_once_even_in_a_crash_loop():
    record = Record(deaths=5, started_at=0.0, ready_since=1.0)
    action = POLICY.on_death(record, 2.0, Cause.RESTART)
    assert action.verdict is Verdict.RESPAWN and action.at == 2.0


def test_boot_failures_halt_after_n_and_retry_every_failed_retry_s():
    clock, record, seen = Clock(), Record(), []
    for _ in range(POLICY.boot_failures_to_fail):
        record = POLICY.on_start(record, clock.now)
        action = POLICY.on_boot_failure(record, clock.advance(0.5))
        seen.append((action.verdict, action.at - clock.now))
        record, clock.now = action.record, action.at
    assert seen == [(Verdict.RESPAWN, 0), (Verdict.RESPAWN, 1), (Verdict.FAIL, 30)]
    assert record.boot_failures == 3
    # a worker that dies before it is ready failed to boot, as one that said so
    dying = POLICY.on_death(POLICY.on_start(Record(boot_failures=2), 0.0), 1.0)
    assert dying.verdict is Verdict.FAIL and dying.at == 31.0
    # a boot that succeeds clears the count
    assert POLICY.on_ready(record, clock.now).boot_failures == 0


def test_a_lost_device_is_unavailable_and_a_removal_stops():
    record = Record(ready_since=0.0)
    lost = POLICY.on_death(record, 5.0, Cause.DEVICE_LOST)
    assert lost.verdict is Verdict.UNAVAILABLE and lost.at == 35.0
    assert lost.record.deaths == 0  # not the worker's fault: no backoff
    assert POLICY.on_death(record, 5.0, Cause.REMOVED).verdict is Verdict.STOP
    assert POLICY.on_death(record, 5.0, Cause.SHUTDOWN).verdict is Verdict.STOP


def test_quarantine_after_two_deaths():
    assert not POLICY.quarantined(1)
    assert POLICY.quarantined(2)
    assert RecoveryPolicy(max_attempts=3).quarantined(2) is False


def test_the_hang_rule():
    clock = Clock()
    record = booted(POLICY, Record(), clock)
    fine = Vitals(heartbeat_age=POLICY.hang_timeout_s, progress_age=1.0, unhealthy_for=None)
    assert POLICY.on_tick(record, clock.now, fine) is None  # at the limit, not past it
    hung = POLICY.on_tick(record, clock.now, Vitals(heartbeat_age=5.5))
    assert hung.kind is KillKind.HANG and "5.5 s" in hung.reason
    stalled = POLICY.on_tick(record, clock.now, Vitals(heartbeat_age=0.2, progress_age=21.0))
    assert stalled.kind is KillKind.STALL
    lost = POLICY.on_tick(record, clock.now, Vitals(unhealthy_for=3.0))
    assert lost.kind is KillKind.DEVICE_LOST
    assert POLICY.on_tick(record, clock.now, Vitals()) is None  # nothing seen, nothing done


def test_a_slow_boot_is_killed_after_boot_timeout_s():
    clock = Clock()
    record = POLICY.on_start(Record(), clock.now)
    assert POLICY.on_tick(record, clock.advance(59.0), Vitals()) is None
    slow = POLICY.on_tick(record, clock.advance(2.0), Vitals())
    assert slow.kind is KillKind.BOOT_TIMEOUT and "boot_timeout_s=60" in slow.reason
    ready = POLICY.on_ready(record, clock.now)
    assert POLICY.on_tick(ready, clock.advance(100.0), Vitals()) is None


def test_from_config_reads_the_settings_it_knows():
    from vibevoice_pool.config import build

    policy = RecoveryPolicy.from_config(build({"hang_timeout_s": 7, "max_attempts": 3}))
    assert policy.hang_timeout_s == 7 and policy.max_attempts == 3
