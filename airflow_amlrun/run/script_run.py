"""ScriptRun: one submitted run, from its first row in the history to its final status."""

from __future__ import annotations

import collections
import contextlib
import logging
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from airflow_amlrun.config import Settings, load_settings
from airflow_amlrun.environment import resolve_environment
from airflow_amlrun.errors import (
    AmlRunError,
    RunCanceledError,
    RunFailedError,
    RunTimeoutError,
    TargetUnreachableError,
)
from airflow_amlrun.heartbeat import Heartbeat, heartbeat_seconds
from airflow_amlrun.history import (
    HistoryRefusedError,
    HistoryUnavailableError,
    RunBookkeeper,
    RunRecord,
    RunStatus,
)
from airflow_amlrun.rerun import recorded_submission
from airflow_amlrun.run.outcome import TIMED_OUT, Asked, outcome
from airflow_amlrun.run.outputs import collect_outputs, register_models
from airflow_amlrun.run.reattach import reattach
from airflow_amlrun.run.state import STOP_REQUESTED_TAG, FollowState, PartlyCollectedError, RunEndedError
from airflow_amlrun.run.streams import RunStreams
from airflow_amlrun.run_api import RunApi
from airflow_amlrun.run_output import OutputLine, print_output
from airflow_amlrun.submission import (
    AirflowTask,
    record_new_run,
    recorded_handle,
    recorded_job,
    warn_of_unused_sections,
)
from airflow_amlrun.targets.base import CodeSource, ComputeTarget, Job, TargetStatus
from airflow_amlrun.targets.handles import RunHandle
from airflow_amlrun.targets.registry import resolve_target

if TYPE_CHECKING:
    import os

    from airflow_amlrun.runconfig import ScriptRunConfig
    from airflow_amlrun.workspace import Workspace

log = logging.getLogger(__name__)


class ScriptRun(RunApi):
    """A run submitted to a compute target; wait for it with `wait_for_completion`. The run API (``get_metrics``,
    ``download_files``, ``tag``, ...) is ``RunApi``'s."""

    def __init__(
        self, workspace: Workspace, target: ComputeTarget[Any], job: Job, settings: Settings
    ) -> None:
        self.workspace = workspace
        self.target = target
        self.job = job
        self.settings = settings
        self.handle: RunHandle | None = None
        self._timed_out = False
        self._cancel_requested = False
        # A moment past which this follower stops the run itself, and why (the task's execution_timeout).
        self._stop_at: datetime | None = None
        self._stop_reason_when_stopped = ""
        self._stop_reason: str | None = None
        # Why a stop was asked (cancel), once it was; the run then ends Canceled with it, unless it ended otherwise.
        self._stop_requested: str | None = None
        self._waiting = False
        # Whether a stop now is a stop before the run starts on its target: from the moment submit records the
        # run until it starts it there (see _start and cancel).
        self._before_start = False
        # Whether the target prepares the run (a run directory written, an environment built): see cancel.
        self._preparing = False
        # Whether a start that failed found the run on its target and stopped it there (see _submit).
        self._stopped_in_submit = False
        # How the run ended, as a look before it was followed found it (see found_ended).
        self._found_ended: TargetStatus | None = None
        # Whether this process is reading the rest of the ended run and recording its end (see _recording_end).
        self._concluding = False
        self._started = _now()
        self._finished: RunRecord | None = None
        # Status, tags and metrics while the run goes on: written when the history answers, never fatal.
        self._book = RunBookkeeper(workspace.history, job.run_id)
        self._heartbeat = Heartbeat(workspace.history, job.run_id, heartbeat_seconds(settings))
        # Its output and events, as far as this process read them.
        self._streams = RunStreams(job.run_id, self._book, self._heartbeat.tick)
        # False when this process only settles a run someone else started (reconcile): an interruption here
        # then leaves the run and its row alone, for the next reconcile.
        self._owned = True
        self._outcome_tags: dict[str, str] = {}
        # Whether submit found this run left by an earlier try of the task, rather than starting it.
        self.reattached = False

    @property
    def id(self) -> str:
        """The run's id in the run history (`run_id` in the task's XCom)."""
        return self.job.run_id

    @property
    def log_tail(self) -> collections.deque[OutputLine]:
        """The last lines of the run's output this process read (or, taking the run over, read again)."""
        return self._streams.log_tail

    @property
    def recorded_end(self) -> RunRecord | None:
        """The run's record once this process recorded how it ended (a run stopped before it started: as soon
        as submit returns), else None."""
        return self._finished

    @classmethod
    def submit(
        cls,
        workspace: Workspace,
        experiment: str,
        config: ScriptRunConfig,
        *,
        tags: dict[str, str] | None = None,
        base_dir: str | os.PathLike[str] | None = None,
        airflow_task: AirflowTask | None = None,
        reattach_on_retry: bool = True,
        rerun_of: RunRecord | None = None,
        parent_run_id: str | None = None,
        on_created: Callable[[ScriptRun], None] | None = None,
    ) -> ScriptRun:
        """Validate everything, then record the run and start it; see Experiment.submit.

        :param parent_run_id: the sweep this run is a child of.
        :param on_created: called with a new run once it is recorded, before it is started: whoever must stop it
            if interrupted (a sweep) holds it from then on, with no moment in which it runs unheld.

        :param rerun_of: the recorded run this one repeats (``rerun``): its snapshot and git state are used
            as they are, and the new run names it.
        """
        settings = load_settings()
        config = config.resolved(base_dir)
        target = resolve_target(config.compute_target, settings, workspace.cache_dir)
        environment = resolve_environment(workspace, config.environment)
        warn_of_unused_sections(environment, target)
        # A sweep's runs are never found by their task's fields: the task's sweep follows (or settles) them.
        if airflow_task is not None and parent_run_id is None:
            attached = reattach(
                cls, workspace, config, environment, target, airflow_task, settings, follow=reattach_on_retry
            )
            if attached is not None:
                return attached
        recorded = record_new_run(
            workspace,
            experiment,
            config,
            environment,
            target,
            settings,
            tags=tags,
            airflow_task=airflow_task,
            rerun_of=rerun_of,
            parent_run_id=parent_run_id,
        )
        run = cls(workspace, target, recorded.job, settings)
        run._before_start = True
        try:
            if on_created is not None:
                on_created(run)
            run._start(recorded.code, recorded.environment)
        finally:
            # Interrupted before the start began (Ctrl-C as it is called), a stop from here on ends the run
            # itself (see cancel).
            run._before_start = False
        return run

    @classmethod
    def following(
        cls,
        workspace: Workspace,
        target: ComputeTarget[Any],
        job: Job,
        handle: RunHandle,
        record: RunRecord,
        settings: Settings,
    ) -> ScriptRun:
        """A recorded run on its target, to be followed from this process (a retry, or reconcile)."""
        run = cls(workspace, target, job, settings)
        run.handle = handle
        run._started = record.start or _now()
        run._stop_requested = record.tags.get(STOP_REQUESTED_TAG)
        following = workspace.history.update_unfinished_run(
            record.id,
            status=RunStatus.RUNNING,
            handle=handle.to_json(),
            start_time=run._started,
            heartbeat_at=_now(),
        )
        if not following:
            # Recorded as ended by another process since it was read: its outcome stands.
            raise RunEndedError(workspace.history.get_run(record.id))
        run._heartbeat.start()
        return run

    @classmethod
    def resumed(
        cls, workspace: Workspace, run_id: str, state: FollowState, settings: Settings | None = None
    ) -> ScriptRun:
        """A recorded run to follow on from where another process left it (see `hand_over`).

        :param workspace: the run's workspace.
        :param run_id: the run.
        :param state: what `hand_over` returned in the process that followed it so far.
        :param settings: this process's settings (default: loaded).
        """
        settings = settings or load_settings()
        record = workspace.history.get_run(run_id)
        if record.status.is_terminal:
            raise RunEndedError(record)
        target = resolve_target(record.target, settings, workspace.cache_dir)
        job = recorded_job(record)
        handle = recorded_handle(target, record, job)
        if handle is None:
            raise AmlRunError(f"Run {run_id} has no handle on {record.target}: it never reached its target.")
        unreachable = target.attachable(handle)
        if unreachable is not None:
            raise TargetUnreachableError(f"Run {run_id} cannot be followed from here: {unreachable}.")
        run = cls.following(workspace, target, job, handle, record, settings)
        run._streams.resume(state)
        run._timed_out, run._cancel_requested = state.timed_out, state.cancel_requested
        run._stop_reason = state.stop_reason
        run._streams.recall_tail(target, handle)
        return run

    def found_ended(self, status: TargetStatus) -> None:
        """How the run ended, as a look at it before it is followed found: the first step takes it rather than
        look again (a target's look at an ended run may act, and tell of it, once: it ends what the run left
        running)."""
        self._found_ended = status

    def forget_stop_request(self) -> None:
        """Follow the run to its end as it ends, whatever stop an earlier follower asked of it (see ``reattach``)."""
        self._stop_requested = None

    def stop_at(self, when: datetime, reason: str) -> None:
        """Stop the run at `when` if it still runs, recording it Failed with `reason`.

        :param when: an aware datetime.
        :param reason: the run's error, e.g. that the task's execution_timeout passed.
        """
        self._stop_at, self._stop_reason_when_stopped = when, reason

    def hand_over(self, timeout: float = 60.0) -> FollowState:
        """Stop following the run from this process, leaving it running, and say how far it got.

        What this process read but did not record yet (metrics, tags) is written first: another process
        goes on from the returned offsets and never reads it again.

        :param timeout: how long to wait for an unavailable history before giving up.
        :raises HistoryUnavailableError: the history did not take what was pending; this process still
            follows the run (its heartbeat goes on), and may try again or go on following it.
        """
        if not self._book.drain(timeout):
            raise HistoryUnavailableError(
                f"Run {self.id}: the run history at {self.workspace.history.url_for_display} did not take its "
                f"latest metrics, tags or status within {timeout:.0f} s, so it is not handed over.",
                run_id=self.id,
            )
        self._heartbeat.stop()
        if self.handle is not None:
            try:
                self.target.detach(self.handle)
            except Exception as err:  # what stays open ends with the run or the process
                log.warning("Run %s: letting go of it on %s failed: %s", self.id, self.target.name, err)
        return FollowState(
            log_offset=self._streams.log_offset,
            events_offset=self._streams.events_offset,
            event_seq=self._streams.event_seq,
            timed_out=self._timed_out,
            cancel_requested=self._cancel_requested,
            stop_reason=self._stop_reason,
            model_requests=tuple(self._streams.model_requests),
        )

    def abandon(self) -> None:
        """Stop following the run from this process at once, with nothing written: for a process that cannot
        hand it over (the history is away) but must let go; what it did not record is read again by whoever
        follows the run next from an earlier offset, or lost with it."""
        self._heartbeat.stop()
        if self.handle is not None:
            try:
                self.target.detach(self.handle)
            except Exception as err:
                log.warning("Run %s: letting go of it on %s failed: %s", self.id, self.target.name, err)

    def let_go(self, timeout: float = 5.0) -> None:
        """Stop following the run from this process, whatever the history says, leaving it running: handed over
        if the history takes what was read of it within `timeout` seconds, else abandoned. Its heartbeat and
        streams end either way; whoever follows it next reads again what was not recorded."""
        try:
            self.hand_over(timeout=timeout)
        except HistoryUnavailableError:
            self.abandon()

    def settle_only(self, tags: dict[str, str]) -> None:
        """Follow this run as an outsider (reconcile): if this process is interrupted or loses the target, the
        run and its row are left as they are, rather than stopped or recorded Canceled.

        :param tags: tags recorded with the outcome, if this process is the one that records it.
        """
        self._owned = False
        self._outcome_tags = dict(tags)

    def _start(self, code: CodeSource, environment: dict[str, Any]) -> None:
        """Prepare and start the run on its target; a stop asked before it starts there (a task killed as it
        submits) ends it Canceled without starting it.

        :param environment: the run's environment record, to which the target's own (its image) is added.
        """
        self._heartbeat.start()
        try:
            if self._stopped_before_start():
                return
            self._book.update(status=RunStatus.PREPARING)
            self._preparing = True
            try:
                self.target.prepare(self.job, code)
            finally:
                self._preparing = False
            self._book.update(status=RunStatus.STARTING)
            if self._stopped_before_start():
                return
            self.handle = self._submit()
            self._started = _now()
            ran_in = self.handle.environment_record()
            self._book.update(
                status=RunStatus.RUNNING,
                handle=self.handle.to_json(),
                start_time=self._started,
                heartbeat_at=_now(),
                **({"environment": {**environment, **ran_in}} if ran_in else {}),
            )
        except TargetUnreachableError as err:
            # The target may have started the run before its answer was lost: the row stays Starting, for a
            # retry to find the run on the target by its id (or to record it Lost), never a second one blindly.
            log.error("Run %s is left unfinished in the history: %s", self.id, err)
            # A stop asked as it started: whoever settles the run (a retry, reconcile) carries it out.
            self._leave_unfinished(self._stop_requested_or_default if self._cancel_requested else None)
            raise
        except BaseException as err:
            history_failed = isinstance(err, HistoryUnavailableError | HistoryRefusedError)
            if history_failed and self.handle is None and self._finished is None:
                # Recording its end (a stop before it started) waited for the history as long as it may: not again
                # here. The row is left as it was, for reconcile.
                self._heartbeat.stop()
                raise
            if self.handle is None and self._cancel_requested:
                # Stopped as it was prepared, and the preparing failed with it (a build's process, in the task's
                # process group, which Airflow's stop reaches as well): Canceled, never started.
                self._stopped_before_start()
                raise
            if self.handle is not None and not self._stopped_in_submit and not self._stopped_after_start(err):
                raise
            if self._cancel_requested:
                # A stop was asked as the target started it (the task killed), and the start failed with it,
                # the run found and stopped there: Canceled, as the stop asked.
                self._finish(RunStatus.CANCELED, self._stop_requested_or_default)
            else:
                self._finish(RunStatus.FAILED, f"The run could not be started: {err}")
            raise
        # Started and recorded Running: a stop from here on is asked of the target (submit's `finally` ends the
        # window on the paths that raise).
        self._before_start = False
        if self._cancel_requested:
            # Asked while the target started it, and asked of the target now, the row saying Running: whoever
            # follows or cancels the run records its end. A stop that fails is asked again by them.
            self._book.add_tags({STOP_REQUESTED_TAG: self._stop_requested_or_default})
            try:
                self.request_stop()
            except Exception:
                log.exception("Run %s: stopping it as it started failed; it is asked again", self.id)

    def _stopped_after_start(self, interruption: BaseException) -> bool:
        """Stop a run started, then interrupted before it was recorded running (Ctrl-C, the task killed): not left
        running unseen while its row says it ended. False if the stop failed: the run may go on, and its row, left
        unfinished, says where it runs and that a stop was asked, for a retry or reconcile to stop and settle it
        (so too if the stop itself is interrupted)."""
        assert self.handle is not None
        stopped = False
        try:
            self.target.cancel(self.handle)
            stopped = True
        except Exception:
            log.exception(
                "Run %s: stopping it after its start was interrupted failed; its row is left unfinished with where "
                "it runs, for a retry of this task or `amlrun reconcile` to stop and settle it",
                self.id,
            )
        finally:
            if not stopped:
                why = (
                    f"{type(interruption).__name__}: {interruption}"
                    if str(interruption)
                    else type(interruption).__name__
                )
                self._leave_unfinished(
                    self._stop_requested_or_default
                    if self._cancel_requested
                    else f"Stopped: its start was interrupted ({why})."
                )
        return stopped

    def _leave_unfinished(self, stop: str | None) -> None:
        """Let go of a run whose start did not end clearly, its row unfinished for a retry or reconcile to settle:
        the row says where the run is, if that is known, and why to stop it, if it must be."""
        if self.handle is not None:
            self._book.update(handle=self.handle.to_json())
        if stop is not None:
            self._book.add_tags({STOP_REQUESTED_TAG: stop})
        self._book.flush()
        self._heartbeat.stop()

    @property
    def _stop_requested_or_default(self) -> str:
        """Why a stop was asked, for the tag that carries it to whoever settles the run."""
        return self._stop_requested or "Canceled."

    def _stopped_before_start(self) -> bool:
        """If a stop was asked before the run started on its target, record it Canceled, remove what preparing it
        left there, and say so."""
        if not self._cancel_requested:
            return False
        self._finish(RunStatus.CANCELED, self._stop_requested or "Canceled before it started.")
        try:
            self.target.discard(self.job)
        except Exception as err:
            log.warning("Run %s: what it left on %s was not removed (%s)", self.id, self.target.name, err)
        return True

    def _submit(self) -> RunHandle:
        """Start the run on its target; if starting it was interrupted, make sure it does not run unseen."""
        try:
            handle: RunHandle = self.target.submit(self.job)
            return handle
        except TargetUnreachableError:
            raise
        except BaseException as err:
            # The target may have started it before the answer was lost (an interrupted round trip): a run
            # the row does not know of would go on unwatched, so look for it by its id and stop it. If that
            # cannot be made sure of, the row is left unfinished rather than recorded Failed, for a retry
            # to follow the run (one execution) and for `amlrun reconcile` to settle it.
            try:
                found = self.target.find(self.job)
            except Exception as look_err:
                raise TargetUnreachableError(
                    f"Run {self.id}: starting it on {self.target.name} failed ({err}), and looking for it "
                    f"there failed too ({look_err}), so it may be running. Its row is left Starting: a retry "
                    "of this task finds it there, and `amlrun reconcile` settles it if no retry comes."
                ) from err
            if found is None:
                raise
            self.handle = found
            try:
                self.target.cancel(found)
                self._stopped_in_submit = True
            except Exception as stop_err:
                raise TargetUnreachableError(
                    f"Run {self.id}: starting it on {self.target.name} failed ({err}), but it was found "
                    f"running there, and stopping it failed ({stop_err}). Its row is left Starting with "
                    "where it runs: a retry of this task follows it, and `amlrun reconcile` settles it if no "
                    "retry comes."
                ) from err
            raise

    # waiting

    def rerun(
        self,
        compute_target: str | None = None,
        *,
        tags: dict[str, str] | None = None,
        secret_environment_variables: dict[str, str] | None = None,
    ) -> ScriptRun:
        """Submit this run again as a new run; see ``rerun``."""
        return rerun(
            self.workspace,
            self.id,
            compute_target=compute_target,
            tags=tags,
            secret_environment_variables=secret_environment_variables,
        )

    def wait_for_completion(
        self,
        show_output: bool = True,
        raise_on_error: bool = True,
        output: Callable[[str], None] | None = None,
    ) -> RunRecord:
        """Stream the script's output while it runs, then record the outcome.

        :param show_output: pass each line the script prints to `output` (default: print it, to stderr if the
            script wrote it there).
        :param raise_on_error: raise RunFailedError / RunCanceledError unless the run Completed.
        :param output: where lines go, each an `OutputLine` (a str saying its stream); the operator sends them
            to the task log.
        """
        emit = (output or print_output) if show_output else None
        record = self._follow(emit) if self._finished is None else self._finished
        if raise_on_error:
            self._raise_for(record)
        return record

    def step(self, emit: Callable[[str], None] | None, timeout: float | None = None) -> TargetStatus | None:
        """Follow the running run for at most a poll interval: pass new lines of its output to `emit`, record
        new metrics and tags, stop it past its limits. Returns its final status once it ended (every line then
        read), else None. `wait_for_completion` is these steps and `conclude`.

        :param timeout: longest wait for the run to end (default ``[amlrun] poll_interval_seconds``); 0 looks
            once without waiting.
        """
        assert self.handle is not None
        self._heartbeat.watch(True)
        self._heartbeat.tick()
        wait = self.settings.poll_interval_seconds if timeout is None else timeout
        status = self._found_ended if self._found_ended is not None else self.target.wait(self.handle, wait)
        self._found_ended = None
        if not status.running:
            with self._recording_end():
                self._drain(emit, final=True)
            self._heartbeat.watch(False)
            return status
        self._drain(emit, final=False)
        self._book.flush()
        # What a stop explains is kept only if the stop found the run going: one that ended on its own meanwhile
        # is recorded as it ended, at the next look.
        if self._cancel_requested:
            self.target.cancel(self.handle)  # again: an earlier stop found the run going, and it still runs
        elif self._past_deadline() and not self._timed_out:
            self._timed_out = True
            self._timed_out = self.target.cancel(self.handle)
        elif self._stop_at is not None and _now() >= self._stop_at and self._stop_reason is None:
            self._stop_reason = self._stop_reason_when_stopped
            if not self.target.cancel(self.handle):
                self._stop_reason = None
        return None

    def _past_deadline(self) -> bool:
        if self.job.max_run_duration_seconds is None:
            return False
        # Counted from the run's start, which for a re-attached or resumed run lies before this process.
        return (_now() - self._started).total_seconds() > self.job.max_run_duration_seconds

    def conclude(self, status: TargetStatus, emit: Callable[[str], None] | None = None) -> RunRecord:
        """Record the outcome of a run that ended with `status`: read what is left of its output, collect its
        outputs, record its status, tidy the target. For a run followed elsewhere until it ended.

        :param emit: where the rest of its output goes; one that fails stops getting lines, and the outcome is
            recorded all the same.
        """
        with self._recording_end():
            self._drain(_failing_quietly(emit, self.id), final=True)
            return self._conclude(status)

    @contextlib.contextmanager
    def _recording_end(self) -> Iterator[None]:
        """While this process reads the rest of the ended run and records its end: a stop asked meanwhile (a
        kill, whose handler runs on this same thread) has nothing to stop and must not read the run again. Once
        out of it, a stop is handled again (should the reading have failed, it records the end itself)."""
        self._concluding = True
        try:
            yield
        finally:
            self._concluding = False

    def _follow(self, emit: Callable[[str], None] | None) -> RunRecord:
        assert self.handle is not None
        self._waiting = True
        try:
            while True:
                status = self.step(emit)
                if status is not None:
                    return self._conclude(status)
        except (HistoryUnavailableError, TargetUnreachableError) as err:
            # The run ended on its target but its outcome could not be recorded, or the target cannot be
            # reached to tell: either way the run may be fine, and recording anything else would be wrong.
            # The row stays unfinished, for a retry to re-attach to (or reconcile to settle).
            log.error("Run %s is left unfinished in the history: %s", self.id, err)
            self._heartbeat.stop()
            raise
        except HistoryRefusedError as err:
            # The run ended and the history refused part of its outcome: stopping or recording anything else
            # would be wrong, and waiting would not help.
            log.error("Run %s: %s", self.id, err)
            self._heartbeat.stop()
            raise
        except BaseException as err:
            if not self._owned:
                # Settling someone else's run was interrupted: leave it, and its row, for the next reconcile.
                self._heartbeat.stop()
                raise
            # The waiting side was interrupted (task killed, timeout, Ctrl-C) or lost its target: the run must
            # not outlive it as a stray process, nor stay Running in the history. Stopping it is best effort
            # (the target may be what failed); recording the outcome is not.
            if self._finished is None:
                stopped = True
                try:
                    stopped = self.target.cancel(self.handle)
                    self._drain(emit, final=True)
                except Exception:
                    log.exception("Run %s: stopping the run after %r failed too", self.id, err)
                ended = None if stopped or self._cancel_requested else self._ended()
                if ended is not None:
                    # It ended on its own before any stop reached it: recorded as it ended.
                    self._conclude(ended)
                elif type(err).__name__ == "AirflowTaskTimeout":
                    self._finish(RunStatus.FAILED, TIMED_OUT)
                elif isinstance(err, Exception) and type(err).__name__ != "AirflowTaskTerminated":
                    self._finish(RunStatus.FAILED, f"Following the run on its target failed: {err}")
                else:
                    self._finish(
                        RunStatus.CANCELED,
                        f"Canceled: the waiting task was interrupted ({type(err).__name__}).",
                    )
            raise
        finally:
            self._heartbeat.watch(False)
            self._waiting = False

    def _drain(self, emit: Callable[[str], None] | None, final: bool) -> None:
        assert self.handle is not None
        self._streams.drain(self.target, self.handle, emit, final=final)

    def _conclude(self, status: TargetStatus) -> RunRecord:
        if status.timed_out:
            # The target enforced the limit itself (e.g. while no task was following the run).
            self._timed_out = True
        asked = Asked(
            cancel_requested=self._cancel_requested,
            stop_requested=self._stop_requested,
            stop_reason=self._stop_reason,
            timed_out=self._timed_out,
            max_run_duration_seconds=self.job.max_run_duration_seconds,
        )
        return self._finish(*outcome(status, asked))

    # ending

    def request_stop(self, reason: str | None = None) -> None:
        """Stop the run on its target now, recording nothing here: whoever follows it records it Canceled, or as
        it ended if the stop found that it had ended on its own. Asked before the run started there, the start
        records it Canceled with `reason` instead, and starts nothing."""
        if self._before_start:
            self._stop_before_start(reason)
            return
        # Raised first: a follower in another thread that sees the run end by this stop records it Canceled
        # (and, should the stop fail, asks the target again at its next look).
        asked_before = self._cancel_requested
        self._cancel_requested = True
        if self.handle is not None and not self.target.cancel(self.handle) and not asked_before:
            self._cancel_requested = False

    def _stop_before_start(self, reason: str | None) -> None:
        """Ask the start under way not to start the run (see cancel)."""
        if reason is not None:
            self._stop_requested = reason
        self._cancel_requested = True
        if self._preparing and self._stop_requested is not None:
            # Preparing can outlast Airflow's patience (an environment built: the task is killed outright 5 s after
            # on_kill): the row says a stop was asked, for whoever settles the run never started (a retry,
            # reconcile) to record it Canceled rather than lost. Best effort: written at once if the history
            # answers (this process writes nothing else to it while the target prepares), else lost with the
            # process, the run then settled as lost.
            self._book.add_tags({STOP_REQUESTED_TAG: self._stop_requested})

    def _ended(self) -> TargetStatus | None:
        """How the run ended, looked at after a stop; None if the target cannot tell, or says it runs."""
        assert self.handle is not None
        try:
            status = self.target.wait(self.handle, 0)
        except Exception:
            log.exception("Run %s: looking at how it ended after its stop failed", self.id)
            return None
        return None if status.running else status

    def cancel(self, reason: str = "Canceled.", output: Callable[[str], None] | None = None) -> None:
        """Stop the run on its target; it ends Canceled (or as it ended, if it already had).

        :param reason: recorded as the run's error when nobody is following the run (who follows it records
            why it ended); also when recording the end here fails and another look records it.
        :param output: where the rest of the script's output goes when nobody is following the run (as in
            `wait_for_completion`): a task killed before it began to follow its run still shows what the
            script printed. Who follows the run passes on the rest itself.
        """
        if self._finished is not None or self._concluding:
            # Ended; or its end is being recorded (a kill while the rest of the run is read).
            return
        if self._before_start:
            # Recorded, and being started (a kill as the task submits, in Airflow's signal handler, which returns
            # into the start): a start that has not reached the target yet records the run Canceled and starts
            # nothing; one that has asks the target to stop it once its handle is known, and is recorded
            # Running first, so that this cancel, called again, records its end.
            self._stop_before_start(reason)
            return
        if self.handle is None:
            # Recorded but never started (its start failed without knowing whether the target started it): nothing
            # is known to run on the target, and the row ends here rather than stay Starting.
            self._finish(RunStatus.CANCELED, reason)
            return
        if self._waiting:
            # The follower, which may see the run end at any moment, records its end.
            self.request_stop()
            return
        # Nobody is following the run: record its end here. One that already ended keeps its outcome.
        status = self.target.wait(self.handle, 0)
        if not status.running:
            self.conclude(status, output)
            return
        # Why, first: should the stop, or reading the rest of the run and recording its end here, fail, whoever
        # records the run's end later records it Canceled with this reason (see _conclude). (Written now if the
        # history answers; if it is away, this process keeps it and writes it with the rest: only this process
        # dying as well loses it, and the run is then recorded as any killed task's.) A stop that fails
        # leaves the run going on: whoever called may try again (a sweep whose policy stops the run) or let it
        # go; a later look at it does not stop it unasked.
        self._stop_requested = reason
        self._book.add_tags({STOP_REQUESTED_TAG: reason})
        if not self.target.cancel(self.handle):
            ended = self._ended()
            if ended is not None:
                # It ended on its own since the look above: recorded as it ended (an end by a stop's signal, from
                # elsewhere, as stopped: see outcome()).
                self.conclude(ended, output)
                return
        self._cancel_requested = True
        with self._recording_end():
            # What passes the output on (the task log) must not keep the end from being recorded.
            self._drain(_failing_quietly(output, self.id), final=True)
            ended = self._ended()
            if ended is not None:
                # Canceled with why; or Completed, if it exited 0 before the stop reached it (see outcome()).
                self._conclude(ended)
            else:
                self._finish(RunStatus.CANCELED, reason)

    def _finish(self, status: RunStatus, error: str | None) -> RunRecord:
        """The one place a run ends: collect what it produced, record the outcome, tidy the target."""
        if self._finished is not None:
            return self._finished
        fields: dict[str, Any] = {"status": status, "error": error, "end_time": _now()}
        if self.handle is not None:
            # Recorded even when it was found only after a failed start, so the run's files can be found.
            fields["handle"] = self.handle.to_json()
            self._book.update(status=RunStatus.FINALIZING)
            try:
                fields.update(collect_outputs(self.target, self.handle, self.workspace.store, self.id))
            except Exception as err:  # the outcome must be recorded even if collecting fails
                if isinstance(err, PartlyCollectedError):
                    fields.update(err.fields)
                log.exception("Run %s: collecting outputs failed", self.id)
                fields["error"] = f"{error + ' ' if error else ''}Collecting outputs failed: {err}"
                if status is RunStatus.COMPLETED:
                    fields["status"] = RunStatus.FAILED
        if self._streams.model_requests:
            # Before the outcome is recorded: a worker dying here leaves the run unfinished, and the retry that
            # re-attaches registers again (each request once).
            self._outcome_tags["model_registration"] = register_models(
                self.workspace, self.id, self._streams.model_requests, fields["status"], self._book
            )
        # Bounded retries; if the history stays away, HistoryUnavailableError leaves the row for a retry, and
        # the target keeps everything (a container, a run directory) for that retry to find.
        refused: HistoryRefusedError | None = None
        try:
            self._finished = self._book.finish(tags=self._outcome_tags, **fields)
        except HistoryRefusedError as err:
            if err.record is None or "status" in err.fields:
                raise  # the row still shows the run going on: the target keeps what it has, as above
            # Recorded without the refused values: the run is over, and tidied as any other; then the error.
            self._finished, refused = err.record, err
        finally:
            # Recorded, or left for a retry: either way this process no longer follows the run.
            self._heartbeat.stop()
        if self._book.superseded:
            # Another process following the same run (a retry, or reconcile) recorded it first, and tidies it.
            log.warning(
                "Run %s: its outcome was recorded by another process that followed it too (%s); this one's "
                "(%s) is dropped",
                self.id,
                self._finished.status,
                fields["status"],
            )
            return self._finished
        if self.handle is not None:
            remove_files = self.settings.cleanup == "always" or (
                self.settings.cleanup == "on_success" and self._finished.status is RunStatus.COMPLETED
            )
            try:
                self.target.cleanup(self.handle, remove_files=remove_files)
            except Exception as err:  # the outcome is recorded; what is left behind is only named
                log.warning(
                    "Run %s: tidying up on %s failed (%s); nothing else is affected",
                    self.id,
                    self.target.name,
                    err,
                )
        if refused is not None:
            raise refused
        return self._finished

    def _raise_for(self, record: RunRecord) -> None:
        if record.status is RunStatus.COMPLETED:
            return
        tail = [str(line) for line in self.log_tail]
        shown = "\n".join(f"  | {line}" for line in tail[-20:])
        if record.status is RunStatus.CANCELED:
            raise RunCanceledError(
                f"Run {record.id} was canceled. {record.error or ''}".strip(), run_id=record.id
            )
        error_type = RunTimeoutError if self._timed_out else RunFailedError
        message = f"Run {record.id} failed: {record.error}"
        if shown:
            message += f"\nLast lines of its output:\n{shown}"
        raise error_type(message, run_id=record.id, log_tail=tail)


def rerun(
    workspace: Workspace,
    run_id: str,
    *,
    compute_target: str | None = None,
    tags: dict[str, str] | None = None,
    secret_environment_variables: dict[str, str] | None = None,
) -> ScriptRun:
    """Run a recorded run again as a new run of its experiment, which names it (``rerun_of``): its snapshot,
    the exact environment version (and lock) it resolved to, its arguments and config.

    :param workspace: the workspace holding the run.
    :param run_id: the run to repeat.
    :param compute_target: run it there instead of on the target it ran on.
    :param tags: tags of the new run.
    :param secret_environment_variables: the run's secret variables, which are never recorded.
    """
    from airflow_amlrun.runconfig import render_tags

    with recorded_submission(
        workspace,
        run_id,
        compute_target=compute_target,
        secret_environment_variables=secret_environment_variables,
    ) as (record, config):
        return ScriptRun.submit(workspace, record.experiment, config, tags=render_tags(tags), rerun_of=record)


def _now() -> datetime:
    return datetime.now(UTC)


def _failing_quietly(output: Callable[[str], None] | None, run_id: str) -> Callable[[str], None] | None:
    """`output`, made unable to stop what calls it: the first error it raises is logged, and the lines after it
    are no longer passed on (they are in the run's log)."""
    if output is None:
        return None
    failed = False

    def emit(line: str) -> None:
        nonlocal failed
        if failed:
            return
        try:
            output(line)
        except Exception as err:
            failed = True
            log.warning(
                "Run %s: passing its output on failed (%s); the rest is in the run's log.", run_id, err
            )

    return emit


__all__ = ["ScriptRun", "rerun"]
