"""Whether Airflow retries a task whose try failed, as task_will_retry answers it for what the task instance says.

The task instances here carry only what Airflow's runtime task instance gives an operator (try_number, max_tries,
its task); HyperDriveOperator under dag.test, with and without retries, is in
tests/integration/test_hyperdrive_failed_task.py.
"""

from __future__ import annotations

from types import ModuleType, SimpleNamespace
from typing import Any

import pytest

from airflow_amlrun.operators.retries import task_will_retry


@pytest.fixture(scope="module")
def sdk() -> ModuleType:
    """Airflow's task SDK, imported as the tests run rather than when the module is collected (see AIRFLOW_TESTS in
    tests/unit/conftest.py)."""
    import airflow.sdk

    return airflow.sdk


def ti(try_number: int, retries: int, retry_policy: Any = None) -> Any:
    from airflow.sdk import BaseOperator

    task = BaseOperator(task_id="tune", retries=retries, retry_policy=retry_policy)
    # A first try's max_tries is the task's retries (Airflow raises it when the task instance is cleared).
    return SimpleNamespace(try_number=try_number, max_tries=retries, task=task)


@pytest.mark.parametrize(
    ("try_number", "retries", "retried"),
    [(1, 0, False), (1, 1, True), (2, 1, False), (2, 3, True), (4, 3, False)],
)
def test_a_failed_try_is_retried_while_tries_are_left(try_number: int, retries: int, retried: bool) -> None:
    assert task_will_retry(ti(try_number, retries), RuntimeError("boom")) is retried


@pytest.mark.parametrize("error", ["AirflowFailException", "AirflowTaskTerminated"])
def test_what_airflow_never_retries_is_not_retried_with_tries_left(sdk: ModuleType, error: str) -> None:
    assert task_will_retry(ti(1, 3), getattr(sdk.exceptions, error)("no")) is False


def test_a_task_timeout_is_retried_as_any_failure(sdk: ModuleType) -> None:
    assert task_will_retry(ti(1, 1), sdk.exceptions.AirflowTaskTimeout("late")) is True
    assert task_will_retry(ti(2, 1), sdk.exceptions.AirflowTaskTimeout("late")) is False


def test_a_retry_policy_that_fails_the_task_ends_its_retries(sdk: ModuleType) -> None:
    from airflow.sdk.definitions.retry_policy import RetryAction

    policy = sdk.ExceptionRetryPolicy(
        rules=[sdk.RetryRule(exception=PermissionError, action=RetryAction.FAIL)]
    )
    assert task_will_retry(ti(1, 3, policy), PermissionError("denied")) is False
    # One that matches nothing, or asks a retry, leaves it to the tries left: it cannot add tries.
    assert task_will_retry(ti(1, 3, policy), RuntimeError("boom")) is True
    asks = sdk.ExceptionRetryPolicy(rules=[sdk.RetryRule(exception=RuntimeError, action=RetryAction.RETRY)])
    assert task_will_retry(ti(2, 1, asks), RuntimeError("boom")) is False


def test_a_retry_policy_that_raises_leaves_it_to_the_tries_left(sdk: ModuleType) -> None:
    from airflow.sdk.definitions.retry_policy import RetryDecision, RetryPolicy

    class BrokenPolicy(RetryPolicy):
        def evaluate(
            self, exception: BaseException, try_number: int, max_tries: int, context: Any = None
        ) -> RetryDecision:
            raise ValueError("the policy itself fails")

    assert task_will_retry(ti(1, 1, BrokenPolicy()), RuntimeError("boom")) is True
    assert task_will_retry(ti(2, 1, BrokenPolicy()), RuntimeError("boom")) is False


def test_a_task_instance_that_does_not_say_its_tries_is_taken_as_retried() -> None:
    assert task_will_retry(SimpleNamespace(), RuntimeError("boom")) is True
