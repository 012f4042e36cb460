"""Every policy on fake board snapshots, heterogeneous speeds included."""

import random

import pytest

from vibevoice_pool.pool.policies import POLICIES, Ctx, View, choose, pick


def ctx(turn=0, seed=0):
    return Ctx(turn=turn, rng=random.Random(seed))


def test_least_work_prefers_the_fast_free_worker():
    views = [View(0, speed=0.5), View(1, speed=1.0), View(2, speed=0.5)]
    assert choose("least_work", views, 10.0, ctx())[0] == 1


def test_least_work_weighs_queued_work_against_speed():
    # fast worker with 10 s queued: (10+4)/2 = 7; slow idle worker: 4/1 = 4
    views = [View(0, queued_work_s=10.0, speed=2.0), View(1, queued_work_s=0.0, speed=1.0)]
    i, score = choose("least_work", views, 4.0, ctx())
    assert (i, score) == (1, 4.0)
    # with 2 s queued on the fast one: (2+4)/2 = 3 < 4
    views[0] = View(0, queued_work_s=2.0, speed=2.0)
    assert choose("least_work", views, 4.0, ctx()) == (0, 3.0)


def test_least_work_assumes_unmeasured_workers_run_at_the_known_mean():
    views = [View(0, speed=2.0), View(1, speed=0.0), View(2, speed=1.0)]
    scores = POLICIES["least_work"](views, 3.0, ctx())
    assert scores == [1.5, 2.0, 3.0]


def test_seed_reproduces_the_old_formula_exactly():
    views = [
        View(0, inflight=2, mem_used=16.2, mem_total=40.0, util=50.2),
        View(1, inflight=0, mem_used=4.0, mem_total=40.0, util=0.0),
        View(2, inflight=1, mem_used=0.0, mem_total=0.0, util=99.0),
    ]
    scores = POLICIES["seed"](views, 1.0, ctx())
    expected = [
        2 * 10 + (16.2 / 40.0 * 100) * 0.5 + 50.2 * 0.3,
        0 * 10 + 10.0 * 0.5 + 0.0,
        1 * 10 + 0.0 + 99.0 * 0.3,
    ]
    assert scores == pytest.approx(expected, rel=1e-12)
    assert choose("seed", views, 1.0, ctx())[0] == 1


def test_least_queue_counts_requests_in_flight():
    views = [View(0, inflight=3), View(1, inflight=1), View(2, inflight=2)]
    assert choose("least_queue", views, 1.0, ctx())[0] == 1


def test_ties_rotate_with_the_turn():
    views = [View(i) for i in range(3)]
    picks = [choose("least_queue", views, 1.0, ctx(turn=t))[0] for t in range(6)]
    assert picks == [0, 1, 2, 0, 1, 2]
    assert [pick([1.0, 0.0, 0.0], t) for t in range(4)] == [1, 2, 1, 2]


def test_round_robin_visits_every_worker_in_turn():
    views = [View(i, inflight=i) for i in range(4)]
    assert [choose("round_robin", views, 1.0, ctx(turn=t))[0] for t in range(8)] == [0, 1, 2, 3] * 2


def test_power_of_two_picks_the_shorter_of_two_sampled():
    views = [View(0, inflight=5), View(1, inflight=0), View(2, inflight=7), View(3, inflight=1)]
    rng = random.Random(3)
    for _ in range(50):
        c = Ctx(turn=0, rng=rng)
        state = rng.getstate()
        i, _ = choose("power_of_two", views, 1.0, c)
        rng.setstate(state)
        a, b = rng.sample(range(4), 2)
        assert i == min((a, b), key=lambda k: (views[k].inflight, k != a))
        assert views[i].inflight == min(views[a].inflight, views[b].inflight)


def test_random_spreads_over_all_workers():
    views = [View(i) for i in range(4)]
    c = ctx(seed=1)
    seen = {choose("random", views, 1.0, c)[0] for _ in range(200)}
    assert seen == {0, 1, 2, 3}


@pytest.mark.parametrize("name", sorted(POLICIES))
def test_every_policy_returns_one_score_per_worker_and_a_valid_pick(name):
    views = [View(i, inflight=i % 2, speed=1 + i, queued_work_s=i) for i in range(5)]
    scores = POLICIES[name](views, 2.0, ctx())
    assert len(scores) == 5
    i, _ = choose(name, views, 2.0, ctx())
    assert 0 <= i < 5
    assert choose(name, views[:1], 2.0, ctx())[0] == 0
