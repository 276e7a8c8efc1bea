"""Retry policy and backoff, and the Retry / Reject exceptions handlers raise."""

import copy
import dataclasses
import math
import pickle
from collections.abc import Callable
from datetime import timedelta

import pytest

from omnidaemon import Backoff, Reject, Retry, RetryPolicy

# Backoff.delay ------------------------------------------------------------------------------


def test_delay_grows_exponentially_without_jitter() -> None:
    backoff = Backoff(initial=0.5, factor=2.0, maximum=1_000.0, jitter=False)
    assert [backoff.delay(n) for n in range(1, 7)] == [0.5, 1.0, 2.0, 4.0, 8.0, 16.0]


def test_delay_uses_the_factor() -> None:
    backoff = Backoff(initial=1.0, factor=3.0, maximum=1_000.0, jitter=False)
    assert [backoff.delay(n) for n in range(1, 5)] == [1.0, 3.0, 9.0, 27.0]


def test_factor_one_is_a_constant_delay() -> None:
    backoff = Backoff(initial=2.5, factor=1.0, jitter=False)
    assert {backoff.delay(n) for n in range(1, 50)} == {2.5}


def test_delay_is_capped_at_the_maximum() -> None:
    backoff = Backoff(initial=1.0, factor=2.0, maximum=10.0, jitter=False)
    assert [backoff.delay(n) for n in range(1, 8)] == [1.0, 2.0, 4.0, 8.0, 10.0, 10.0, 10.0]


def test_initial_above_maximum_is_capped_too() -> None:
    assert Backoff(initial=50.0, maximum=5.0, jitter=False).delay(1) == 5.0


def test_zero_or_negative_attempt_counts_as_the_first() -> None:
    backoff = Backoff(initial=1.5, jitter=False)
    assert backoff.delay(0) == backoff.delay(-3) == backoff.delay(1) == 1.5


def test_zero_initial_means_no_wait() -> None:
    backoff = Backoff(initial=0.0)
    assert [backoff.delay(n) for n in (1, 2, 100)] == [0.0, 0.0, 0.0]


def test_defaults() -> None:
    backoff = Backoff()
    assert (backoff.initial, backoff.factor, backoff.maximum, backoff.jitter) == (
        1.0,
        2.0,
        300.0,
        True,
    )
    exact = Backoff(jitter=False)
    assert exact.delay(1) == 1.0
    assert exact.delay(100) == 300.0


@pytest.mark.parametrize("attempt", [1, 2, 3, 4, 5, 9, 10, 30])
def test_jitter_stays_between_half_and_all_of_the_nominal_delay(attempt: int) -> None:
    jittered = Backoff(initial=1.0, factor=2.0, maximum=300.0, jitter=True)
    nominal = Backoff(initial=1.0, factor=2.0, maximum=300.0, jitter=False).delay(attempt)
    samples = [jittered.delay(attempt) for _ in range(2_000)]
    assert all(nominal / 2 <= s <= nominal for s in samples)
    # Randomised, and spread over the range rather than bunched at one end.
    assert len(set(samples)) > 1_000
    assert min(samples) < nominal * 0.6
    assert max(samples) > nominal * 0.9


def test_no_jitter_is_exact_and_repeatable() -> None:
    backoff = Backoff(initial=0.3, factor=1.7, maximum=60.0, jitter=False)
    for attempt in range(1, 20):
        expected = min(60.0, 0.3 * 1.7 ** (attempt - 1))
        assert backoff.delay(attempt) == expected
        assert backoff.delay(attempt) == backoff.delay(attempt)


@pytest.mark.parametrize("attempt", [64, 65, 1_000, 10**6, 10**18, 2**200])
@pytest.mark.parametrize("jitter", [False, True])
def test_huge_attempt_numbers_do_not_overflow(attempt: int, jitter: bool) -> None:
    backoff = Backoff(initial=1.0, factor=2.0, maximum=300.0, jitter=jitter)
    delay = backoff.delay(attempt)
    assert math.isfinite(delay)
    assert 150.0 <= delay <= 300.0


@pytest.mark.parametrize("factor", [10.0, 100.0])
def test_huge_attempt_numbers_with_a_steep_factor_do_not_overflow(factor: float) -> None:
    backoff = Backoff(initial=1.0, factor=factor, maximum=60.0, jitter=False)
    assert backoff.delay(10**9) == 60.0


@pytest.mark.parametrize("attempt", [53, 100, 10**6])
def test_very_steep_factor_does_not_overflow(attempt: int) -> None:
    backoff = Backoff(initial=1.0, factor=1e6, maximum=60.0, jitter=False)
    assert backoff.delay(attempt) == 60.0


@pytest.mark.parametrize("attempt", [100, 2_000, 10**6])
def test_zero_initial_stays_zero_for_huge_attempt_numbers(attempt: int) -> None:
    assert Backoff(initial=0.0, jitter=False).delay(attempt) == 0.0


# Invalid arguments --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs",
    [
        {"initial": -0.1},
        {"maximum": -1.0},
        {"factor": 0.5},
        {"factor": 0.0},
        {"factor": -2.0},
    ],
)
def test_invalid_backoff_is_a_value_error(kwargs: dict[str, float]) -> None:
    with pytest.raises(ValueError, match="Backoff"):
        Backoff(**kwargs)


@pytest.mark.parametrize("max_retries", [-1, -100])
def test_negative_max_retries_is_a_value_error(max_retries: int) -> None:
    with pytest.raises(ValueError, match="max_retries"):
        RetryPolicy(max_retries=max_retries)


def test_backoff_and_policy_are_immutable() -> None:
    with pytest.raises(dataclasses.FrozenInstanceError):
        Backoff().initial = 5.0  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        RetryPolicy().max_retries = 5  # type: ignore[misc]


# RetryPolicy --------------------------------------------------------------------------------


@pytest.mark.parametrize(("max_retries", "attempts"), [(0, 1), (1, 2), (3, 4), (10, 11)])
def test_max_attempts_is_first_delivery_plus_retries(max_retries: int, attempts: int) -> None:
    assert RetryPolicy(max_retries=max_retries).max_attempts == attempts


def test_policy_defaults() -> None:
    policy = RetryPolicy()
    assert policy.max_retries == 3
    assert policy.max_attempts == 4
    assert policy.backoff == Backoff()


def test_policy_keeps_its_backoff() -> None:
    backoff = Backoff(initial=0.1, jitter=False)
    policy = RetryPolicy(max_retries=2, backoff=backoff)
    assert policy.backoff is backoff
    assert policy.backoff.delay(2) == pytest.approx(0.2)


# Retry and Reject ---------------------------------------------------------------------------


def test_retry_defaults() -> None:
    exc = Retry()
    assert exc.delay is None
    assert exc.reason == "retry requested"
    assert str(exc) == "retry requested"
    assert isinstance(exc, Exception)


@pytest.mark.parametrize(
    ("delay", "seconds"),
    [
        (timedelta(seconds=90), 90.0),
        (timedelta(minutes=2, milliseconds=500), 120.5),
        (timedelta(0), 0.0),
        (7, 7.0),
        (0.25, 0.25),
    ],
)
def test_retry_delay_is_seconds(delay: float | timedelta, seconds: float) -> None:
    exc = Retry(delay=delay, reason="rate limited")
    assert exc.delay == seconds
    assert isinstance(exc.delay, float)
    assert exc.reason == "rate limited"
    assert str(exc) == "rate limited"


@pytest.mark.parametrize("delay", [-5.0, timedelta(seconds=-3)])
def test_negative_retry_delay_means_now(delay: float | timedelta) -> None:
    assert Retry(delay=delay).delay == 0.0


def test_retry_can_be_raised_and_caught() -> None:
    with pytest.raises(Retry, match="busy") as info:
        raise Retry(delay=timedelta(seconds=1), reason="busy")
    assert info.value.delay == 1.0


def test_reject_reason() -> None:
    exc = Reject("not a pdf")
    assert exc.reason == "not a pdf"
    assert str(exc) == "not a pdf"
    assert isinstance(exc, Exception)
    assert not isinstance(exc, Retry)
    with pytest.raises(Reject, match="not a pdf"):
        raise exc


def test_reject_needs_a_reason() -> None:
    with pytest.raises(TypeError):
        Reject()  # type: ignore[call-arg]


def test_reject_survives_pickling() -> None:
    clone = pickle.loads(pickle.dumps(Reject("not a pdf")))
    assert isinstance(clone, Reject)
    assert clone.reason == "not a pdf"


@pytest.mark.parametrize(
    "original",
    [Retry(), Retry(delay=5, reason="rate limited"), Retry(delay=timedelta(minutes=1))],
    ids=["defaults", "delay-and-reason", "timedelta"],
)
@pytest.mark.parametrize(
    "clone",
    [copy.copy, copy.deepcopy, lambda e: pickle.loads(pickle.dumps(e))],
    ids=["copy", "deepcopy", "pickle"],
)
def test_retry_survives_copy_and_pickling(original: Retry, clone: Callable[[Retry], Retry]) -> None:
    """A Retry may cross a process boundary (a process pool) or be copied by a library."""
    cloned = clone(original)
    assert isinstance(cloned, Retry)
    assert cloned.delay == original.delay
    assert cloned.reason == original.reason
    assert str(cloned) == str(original)
