"""Whether Airflow retries a task whose try fails: for an operator that must end what only a retry would go on with."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from airflow.sdk import Context


def task_will_retry(ti: Any, error: BaseException, context: Context | None = None) -> bool:
    """Whether Airflow retries the task instance `ti` once `error` fails this try, decided as Airflow's task runner
    decides it (``airflow.sdk.execution_time.task_runner``): never after AirflowFailException, AirflowSensorTimeout
    or AirflowTaskTerminated, nor when the task's ``retry_policy`` says to fail; otherwise while tries are left
    (``try_number <= max_tries``, ``max_tries`` being the task's retries).

    A task cleared while it runs is retried by Airflow even with no tries left; that is answered False here (what
    the try leaves is then ended, and the retry starts anew). A task instance that does not say its try number
    and tries (not one Airflow runs) is answered True: nothing is ended for it.

    :param ti: the task instance (``context["ti"]``).
    :param error: what fails this try.
    :param context: the task's context, for its retry_policy.
    """
    from airflow.sdk.exceptions import AirflowFailException, AirflowSensorTimeout, AirflowTaskTerminated

    if isinstance(error, AirflowFailException | AirflowSensorTimeout | AirflowTaskTerminated):
        return False
    try_number, max_tries = getattr(ti, "try_number", None), getattr(ti, "max_tries", None)
    if not isinstance(try_number, int) or not isinstance(max_tries, int):
        return True
    policy = getattr(getattr(ti, "task", None), "retry_policy", None)
    if policy is not None:
        from airflow.sdk.definitions.retry_policy import RetryAction

        try:
            decision = policy.evaluate(
                exception=error, try_number=try_number, max_tries=max_tries, context=context
            )
        except Exception:
            decision = None  # Airflow, too, falls back to the task's retries
        if decision is not None and decision.action is RetryAction.FAIL:
            return False
    return max_tries > 0 and try_number <= max_tries
