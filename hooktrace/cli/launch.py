"""Run a user's script or module in this process with an agent attached, like ``python`` does.

Same ``sys.argv``, ``__name__ == "__main__"``, ``sys.path[0]``, stdin/stdout and exit code; the
script's own traceback is printed as Python prints it. SIGTERM becomes ``SystemExit`` so that
the agent flushes its files on the way out; SIGINT is Python's ``KeyboardInterrupt``.
"""

from __future__ import annotations

import os
import runpy
import signal
import sys
import threading
import traceback
from types import FrameType, TracebackType

from hooktrace.agent import Agent
from hooktrace.config import Config


def _on_sigterm(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(128 + signum)


def _user_traceback(tb: TracebackType | None) -> TracebackType | None:
    """Drop hooktrace's and runpy's own frames from the top of a traceback."""
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    while tb is not None:
        name = tb.tb_frame.f_code.co_filename
        if not (name.startswith(here) or name == runpy.__file__ or name.startswith("<frozen runpy")):
            break
        tb = tb.tb_next
    return tb


class SignalFlusher:
    """Flushes the agent's files as soon as SIGTERM/SIGINT arrives, even while the main thread is
    stuck in C++ (a collective waiting for a dead peer), where Python handlers cannot run yet.

    ``signal.set_wakeup_fd`` makes the C-level handler write the signal number to a pipe; a
    daemon thread reads it and asks the worker to flush. The Python handler still runs later.
    """

    def __init__(self, agent: Agent) -> None:
        self._agent = agent
        self._read, self._write = os.pipe()
        os.set_blocking(self._write, False)
        self._previous = signal.set_wakeup_fd(self._write, warn_on_full_buffer=False)
        threading.Thread(target=self._watch, name="hooktrace-signals", daemon=True).start()

    def _watch(self) -> None:
        while True:
            try:
                data = os.read(self._read, 16)
            except OSError:
                return
            if not data:
                os.close(self._read)
                return
            if any(b in (signal.SIGTERM, signal.SIGINT) for b in data):
                self._agent.flush_now(timeout=3.0)

    def close(self) -> None:
        signal.set_wakeup_fd(self._previous)
        os.close(self._write)  # the watcher sees end of file, exits and closes its end


def _exit_code(exc: SystemExit) -> int:
    code = exc.code
    if code is None:
        return 0
    if isinstance(code, int):
        return code
    print(code, file=sys.stderr)
    return 1


def run_target(config: Config, target: str, args: list[str], *, module: bool, print_summary: bool) -> int:
    """Run ``target`` (a script path, or a module name when ``module``) and return its exit code."""
    agent = Agent(config)
    previous = signal.signal(signal.SIGTERM, _on_sigterm) if _main_thread() else None
    flusher = SignalFlusher(agent) if _main_thread() else None
    saved_argv, saved_path0 = sys.argv[:], sys.path[0] if sys.path else None
    code = 0
    try:
        agent.discover()
        sys.argv = [target, *args]  # python -m rewrites argv[0] to the module's file (alter_sys)
        if module:
            sys.path[0] = os.getcwd()  # like python -m: the current directory comes first
            runpy.run_module(target, run_name="__main__", alter_sys=True)
        else:
            sys.path[0] = os.path.dirname(os.path.abspath(target))
            runpy.run_path(target, run_name="__main__")
    except SystemExit as exc:
        code = _exit_code(exc)
    except KeyboardInterrupt:
        code = 130
        print("KeyboardInterrupt", file=sys.stderr)
    except BaseException as exc:  # the script's own error: print it as Python would
        code = 1
        traceback.print_exception(type(exc), exc, _user_traceback(exc.__traceback__))
    finally:
        sys.argv = saved_argv
        if saved_path0 is not None:
            sys.path[0] = saved_path0
        late: list[int] = []
        if _main_thread():  # a SIGTERM now (torchrun stopping the other ranks) must not cut the flush
            signal.signal(signal.SIGTERM, lambda signum, frame: late.append(signum))
        try:
            summary = agent.close()
        except Exception as exc:  # never replace the script's own outcome
            print(f"hooktrace: could not finish the run's files: {exc}", file=sys.stderr)
            summary = agent.summary()
        if late and code == 0:
            code = 128 + late[0]
        if flusher is not None:
            flusher.close()
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
    if print_summary:
        if summary.steps == 0 and not agent.recorder.table.roots:
            print(
                "hooktrace: no module with trainable parameters ran a training forward pass (grad enabled); "
                "nothing was profiled",
                file=sys.stderr,
            )
        else:
            print(summary.render(), file=sys.stderr)
    return code


def _main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()
