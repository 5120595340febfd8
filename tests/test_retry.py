import random

import pytest

from streamtasks import ConfigError, Retry
from streamtasks.delays import next_hop, parse_tiers, tier_of_topic
from streamtasks.retry import RetryPolicy, call_options


def test_fibonacci_backoff_is_machinerys_sequence():
    policy = RetryPolicy(max_retries=5, backoff="fibonacci", backoff_s=1.0)
    assert [policy.delay_s(n) for n in range(1, 6)] == [1, 2, 3, 5, 8]


def test_exponential_backoff_has_full_jitter_under_a_cap():
    policy = RetryPolicy(max_retries=20, backoff="exponential", backoff_s=1.0, backoff_max_s=30)
    rng = random.Random(7)
    delays = [policy.delay_s(n, rng) for n in range(1, 20) for _ in range(20)]
    assert all(0 <= d <= 30 for d in delays)
    assert max(delays) > 15  # the cap is reached, not just the small early ceilings
    assert len(set(delays)) > 100  # jittered


def test_fixed_backoff_and_retryable_errors():
    policy = RetryPolicy(max_retries=2, backoff="fixed", backoff_s=3, retry_on=(KeyError,))
    assert policy.delay_s(1) == policy.delay_s(5) == 3
    assert policy.retryable(KeyError("x"))
    assert not policy.retryable(ValueError("x"))
    assert policy.retryable(Retry(countdown_s=1))
    assert not RetryPolicy(max_retries=0).retryable(ValueError("x"))


def test_call_options_override_the_policy():
    options = call_options(4, "fixed", 0.5, 123)
    policy = RetryPolicy().with_options(options)
    assert (policy.max_retries, policy.backoff, policy.backoff_s, policy.deadline_ms) == (
        4, "fixed", 0.5, 123)
    with pytest.raises(ConfigError, match="backoff must be one of"):
        call_options(None, "linear", None, None)
    with pytest.raises(ConfigError, match="must not be negative"):
        call_options(-1, None, None, None)


def test_tiers_parse_sorted_and_bad_tiers_are_named():
    tiers = parse_tiers("30s,1s,2m,5s")
    assert [t.delay_ms for t in tiers] == [1000, 5000, 30000, 120000]
    for bad in ("", "5", "0s", "1x", "1s,1000ms"):
        with pytest.raises(ConfigError):
            parse_tiers(bad)


def test_next_hop_never_forwards_early():
    tiers = parse_tiers("1s,5s,30s")
    assert next_hop(tiers, 0) is None
    assert next_hop(tiers, -5) is None
    assert next_hop(tiers, 400).name == "1s"  # below the smallest: wait the smallest
    assert next_hop(tiers, 4999).name == "1s"
    assert next_hop(tiers, 5000).name == "5s"
    assert next_hop(tiers, 10**9).name == "30s"  # beyond the largest: goes round again
    assert tier_of_topic("ns.q.delay.5s", tiers).name == "5s"
    assert tier_of_topic("ns.q", tiers) is None
