"""The fluid network: max-min fair shares, re-shared as flows start and end."""

import math

import numpy as np
import pytest
import simpy

from secmig.sim.network import FluidNetwork, Link


def make(*caps: float) -> tuple[simpy.Environment, FluidNetwork, list[int]]:
    env = simpy.Environment()
    net = FluidNetwork(env)
    return env, net, [net.add_link(Link(f"l{i}", c)) for i, c in enumerate(caps)]


def test_max_min_fair_with_a_capped_flow() -> None:
    """Textbook case: a capped flow keeps its cap, the rest is shared fairly per bottleneck."""
    env, net, (a, b) = make(100.0, 60.0)
    f1 = net.transfer([a], 1000)
    f2 = net.transfer([a, b], 300)
    f3 = net.transfer([b], 300, cap_bytes_per_s=10)
    env.run(until=1)
    assert net.rate_of(f1) == pytest.approx(50)
    assert net.rate_of(f2) == pytest.approx(50)
    assert net.rate_of(f3) == pytest.approx(10)
    env.run()
    # f2 ends at 6 s; f1 then has the whole link: 300 B done, 700 B at 100 B/s.
    assert f2.end_s == pytest.approx(6.0)
    assert f1.end_s == pytest.approx(13.0)
    assert f3.end_s == pytest.approx(30.0)


def test_two_flows_on_one_bottleneck_take_twice_as_long() -> None:
    """Contention: two equal flows on one link each end at 2× the time of one alone."""
    env, net, (a,) = make(100.0)
    alone = net.transfer([a], 1000)
    env.run()
    env2, net2, (b,) = make(100.0)
    x, y = net2.transfer([b], 1000), net2.transfer([b], 1000)
    env2.run()
    assert x.end_s == pytest.approx(2 * alone.end_s) and y.end_s == pytest.approx(2 * alone.end_s)


def test_rates_never_exceed_a_link_and_bytes_are_conserved() -> None:
    """Random flows on random paths: no link over capacity; recorded load integrates to the bytes sent."""
    rng = np.random.default_rng(3)
    env, net, links = make(*rng.uniform(50, 200, 8))
    sizes = []

    def spawner(env: simpy.Environment):  # type: ignore[no-untyped-def]
        for _ in range(40):
            yield env.timeout(float(rng.exponential(1.0)))
            path = sorted(rng.choice(len(links), size=int(rng.integers(1, 4)), replace=False).tolist())
            size = float(rng.uniform(10, 500))
            sizes.append((path, size))
            net.transfer(path, size)
            for i, lk in enumerate(net.links):
                assert net.load_of(i) <= lk.capacity_bytes_per_s * (1 + 1e-9)

    env.process(spawner(env))
    env.run()
    for i, usage in enumerate(net.usage()):
        assert np.all(usage.load_bytes_per_s <= usage.link.capacity_bytes_per_s * (1 + 1e-9))
        expected = sum(s for p, s in sizes if i in p)
        assert usage.carried_bytes() == pytest.approx(expected, rel=1e-6)


def test_flows_at_the_same_instant_share_one_reshare() -> None:
    """A thousand flows started together cost one re-share, not a thousand."""
    env, net, (a,) = make(1000.0)
    for _ in range(1000):
        net.transfer([a], 10)
    env.run()
    assert net.reshares <= 3


def test_cancel_returns_what_was_left() -> None:
    """A cancelled flow reports its remaining bytes and frees its share."""
    env, net, (a,) = make(100.0)
    f = net.transfer([a], 1000)
    g = net.transfer([a], 1000)
    env.run(until=2)
    assert net.cancel(f) == pytest.approx(900)
    env.run()
    assert g.end_s == pytest.approx(2 + 900 / 100)
    assert math.isclose(net.rate_of(f), 0.0)
