"""A process pool that never waits on a dead worker.

``reproduce`` runs its groups in worker processes. ``ProcessPoolExecutor``
has three failure modes that matter here: an exception that cannot be
unpickled in the parent breaks the whole pool (``BrokenProcessPool``); a
worker stopped while it writes a large result leaves the pool's manager
thread blocked forever in ``recv`` (the parent holds the pipe's write end
too, so no EOF comes), and interpreter exit then joins that thread; and a
parent killed by a signal leaves its workers blocked for good.

This pool has none of that:

* each worker has its own pipe, whose worker end the parent closes, so a
  worker that dies mid-message gives EOF, never a hang; there are no helper
  threads to join at exit;
* results and errors are pickled by the worker *before* sending, and an
  error that does not survive a pickle round trip is sent as an
  :class:`S2Error` (or :class:`WorkerError`) carrying its one-line message;
* stopping the pool kills the workers (SIGKILL: they hold nothing that needs
  cleaning up -- the parent alone writes the results store) and reaps them;
* every worker asks the kernel for SIGKILL when its parent dies
  (``PR_SET_PDEATHSIG``, Linux), and also watches its parent's pid, so no
  worker outlives the parent, whatever signal ended it;
* workers ignore SIGINT: Ctrl-C to the process group and to the parent alone
  both end in the parent's ``KeyboardInterrupt``, which stops the pool.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import pickle
import signal
import threading
from multiprocessing.connection import Connection, wait
from typing import Any, Callable, Iterable, Iterator

from .errors import S2Error

PR_SET_PDEATHSIG = 1  # <linux/prctl.h>
PARENT_POLL_S = 0.5


class WorkerError(S2Error):
    """A worker process died, or raised an error that could not cross the
    process boundary as itself; the message says which and why."""


def portable_error(e: BaseException) -> BaseException:
    """E itself if it survives pickling, else an S2Error/WorkerError with its message."""
    try:
        pickle.loads(pickle.dumps(e))
        return e
    except Exception:
        text = str(e).splitlines()[0] if str(e) else type(e).__name__
        if isinstance(e, S2Error):
            return S2Error(text)
        return WorkerError(f"{type(e).__name__} in a worker process: {text}")


def die_with_parent(parent: int) -> None:
    """Make this process exit when PARENT does: PR_SET_PDEATHSIG where the
    kernel has it, and a thread polling the parent's pid everywhere (the
    signal follows the parent *thread* that forked us; the poll covers
    kernels and platforms without it)."""
    try:
        import ctypes
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    except (OSError, AttributeError):
        pass
    # Under fork the parent is our parent; under forkserver (Python 3.14's
    # default) it is the forkserver's, so its pid is watched as well.
    direct = os.getppid() == parent

    def gone() -> bool:
        if direct and os.getppid() != parent:
            return True
        try:
            os.kill(parent, 0)
        except ProcessLookupError:
            return True
        except PermissionError:
            pass
        return False
    if gone():  # the parent died before prctl took effect
        os._exit(1)

    def watch() -> None:
        import time
        while True:
            time.sleep(PARENT_POLL_S)
            if gone():
                os._exit(1)
    threading.Thread(target=watch, name="s2split-parent-watch", daemon=True).start()


def _worker_main(conn: Connection, parent: int, initializer: Callable[[], None] | None) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    die_with_parent(parent)
    if initializer:
        initializer()
    while True:
        try:
            task = conn.recv()
        except (EOFError, OSError):
            return
        if task is None:
            return
        fn, args = task
        try:
            message = pickle.dumps(("ok", fn(*args)))
        except BaseException as e:  # noqa: BLE001 - every error goes back to the parent
            err = portable_error(e)
            err.__traceback__ = None
            err.__context__ = err.__cause__ = None
            message = pickle.dumps(("error", err))
        try:
            conn.send_bytes(message)
        except (BrokenPipeError, OSError):
            return


class _Worker:
    def __init__(self, ctx: Any, initializer: Callable[[], None] | None):
        parent_end, child_end = ctx.Pipe(duplex=True)
        self.process = ctx.Process(target=_worker_main, daemon=True,
                                   args=(child_end, os.getpid(), initializer))
        self.process.start()
        child_end.close()  # so that the worker's death gives EOF here
        self.conn = parent_end
        self.task: Any = None

    def stop(self) -> None:
        if self.process.is_alive():
            try:
                self.process.kill()
            except OSError:
                pass
        self.process.join(timeout=10)
        self.conn.close()


class Pool:
    """``Pool(n).run(fn, items)`` yields ``(item, fn(*args))`` as they finish,
    where each item is ``(key, args)``; the first error stops the pool and is
    raised in the parent."""

    def __init__(self, workers: int, initializer: Callable[[], None] | None = None):
        self.size = max(1, workers)
        self.initializer = initializer

    def run(self, fn: Callable[..., Any],
            items: Iterable[tuple[Any, tuple]]) -> Iterator[tuple[Any, Any]]:
        queue = list(items)
        queue.reverse()
        ctx = mp.get_context()
        workers: list[_Worker] = []
        try:
            # Ctrl-C during a fork would be lost in CPython's fork hooks: hold
            # SIGINT back until the workers exist (it is raised right after).
            masked = hasattr(signal, "pthread_sigmask") and \
                threading.current_thread() is threading.main_thread()
            if masked:
                old = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
            try:
                for _ in range(min(self.size, len(queue))):
                    workers.append(_Worker(ctx, self.initializer))
            finally:
                if masked:
                    signal.pthread_sigmask(signal.SIG_SETMASK, old)
            busy: dict[Connection, _Worker] = {}
            for w in workers:
                if queue:
                    self._give(w, fn, queue.pop(), busy)
            while busy:
                sentinels = {w.process.sentinel: w for w in busy.values()}
                for ready in wait([*busy, *sentinels]):
                    w = busy.get(ready) or sentinels.get(ready)  # type: ignore[arg-type]
                    if w is None or w.conn not in busy:
                        continue
                    item = w.task
                    try:
                        status, value = pickle.loads(w.conn.recv_bytes())
                    except (EOFError, OSError):
                        w.process.join(timeout=10)
                        code = w.process.exitcode
                        how = (f"signal {signal.Signals(-code).name}" if code and code < 0
                               else f"exit status {code}")
                        raise WorkerError(f"a worker process died ({how}) while running "
                                          f"{_label(item)}") from None
                    del busy[w.conn]
                    if status == "error":
                        raise value
                    if queue:
                        self._give(w, fn, queue.pop(), busy)
                    yield item[0], value
        finally:
            for w in workers:
                w.stop()

    @staticmethod
    def _give(w: _Worker, fn: Callable[..., Any], item: tuple[Any, tuple],
              busy: dict[Connection, _Worker]) -> None:
        w.task = item
        try:
            w.conn.send((fn, item[1]))
        except OSError:  # the worker is gone (killed while idle)
            w.process.join(timeout=10)
            raise WorkerError(f"a worker process died (exit status {w.process.exitcode}) "
                              f"before running {_label(item)}") from None
        busy[w.conn] = w


def _label(item: Any) -> str:
    key = item[0] if isinstance(item, tuple) and item else item
    return str(getattr(key, "label", key))
