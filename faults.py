"""What stops a run early: stop signals, faults of the processes, non-finite values.

Each ends the run with one line and exit code 2 (cli.run_cli), except a stop signal, after which
the run saves where it stands and exits 0.
"""

import multiprocessing
import os
import signal
import sys
import threading
import time

import torch

from distributed import get_rank, group_failure


class NonFiniteLossError(RuntimeError):
    """The loss, gradients or weights stopped being finite."""


class ProcessFaultError(RuntimeError):
    """This process cannot go on: another one stalled or died, or a data loader worker died."""


class StopSignal:
    """SIGTERM or SIGUSR1 (a scheduler's notice of preemption) and SIGINT (Ctrl-C) only set
    ``requested`` (and ``name``, the signal's): a host flag, read where the ranks meet anyway
    (``sync_ranks``), so all stop after the same step and save. A second SIGINT ends the process
    at once, with one line and exit code 130.

    But when another process of the group has already ended with an error (``mark_group_failed``;
    torchrun then stops the others with SIGTERM, to restart the group), the ranks can no longer
    meet: the process ends at once, with one line and exit code 2. A thread watches the signals
    (``signal.set_wakeup_fd``), so this holds while the training thread hangs in a step.
    """

    SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)

    def __init__(self, store=None):
        self.requested, self.name = False, None
        self.store = store  # the group's (DistEnv.store), None in one process
        read_end, write_end = os.pipe()
        os.set_blocking(write_end, False)
        signal.set_wakeup_fd(write_end, warn_on_full_buffer=False)
        for signum in self.SIGNALS:
            signal.signal(signum, lambda signum, frame: None)  # the thread below acts on them
        threading.Thread(target=self._watch, args=(read_end,), name="stop-signal", daemon=True).start()

    def _watch(self, read_end):
        while True:
            signum = os.read(read_end, 1)[0]
            if signum not in self.SIGNALS:  # any other signal with a Python handler (SIGCHLD)
                continue
            name = signal.Signals(signum).name
            if self.requested and signum == signal.SIGINT:
                exit_now(f"rank {get_rank()} stopped at once by a second SIGINT, without saving its last steps",
                         128 + signal.SIGINT)  # fmt: skip
            self.requested, self.name = True, self.name or name
            failure = group_failure(self.store)
            if failure is not None:
                exit_now(
                    f"rank {get_rank()} stopped by {name} without saving: another process failed: {failure[:300]}", 2
                )


# set while a thread ends the process (exit_now): what the training thread then meets is its doing
_EXITING = threading.Event()


def exit_now(line, code):
    """End the process from any thread: print ``error: <line>``, kill the data loader workers, exit
    with ``code``. The training thread, which may meet the killed workers meanwhile, waits for the
    exit in ``hold_while_exiting`` instead of reporting them."""
    _EXITING.set()
    print(f"error: {line}", file=sys.stderr, flush=True)
    end_loader_workers()
    os._exit(code)


def hold_while_exiting():
    """Wait for the exit when another thread is ending the process (``exit_now``); else return."""
    while _EXITING.is_set():
        time.sleep(1)


def process_fault(error, config, epoch, step):
    """A one-line ProcessFaultError for ``error``, raised at ``step`` of ``epoch``, when it is a fault
    of the processes (rather than of the code), else None."""
    text = " ".join(str(error).split())
    # torch's words for a worker that died ("DataLoader worker (pid 7) is killed by signal: Killed.", "...
    # (pid(s) 7) exited unexpectedly"), not for one that raised ("Caught OSError in DataLoader worker process 0")
    if "DataLoader worker (pid" in text:
        cause = f"a data loader worker died ({text[:160]}): out of host memory? Lower DATA.NUM_WORKERS"
    elif "timed out" in text.lower() or "timeout" in text.lower():
        cause = (
            f"waited more than DIST_TIMEOUT {config.DIST_TIMEOUT} s for the other processes in a collective: "
            "one of them stalled (a hung file system, a stuck worker) or died"
        )
    elif isinstance(error, torch.distributed.DistError) or "Connection closed" in text or "Connection reset" in text:
        cause = f"lost the connection to another process ({text[:160]}): it died or its node failed"
    else:
        return None
    return ProcessFaultError(f"rank {get_rank()} at epoch {epoch} step {step}: {cause}")


def end_loader_workers():
    """Kill this process's data loader workers: they ignore SIGTERM (ignore_stop_signals), which
    an exit would send them. torch's SIGCHLD handler would report each as a worker that died, with
    a traceback, after the run's one line: in the main thread (the only one that may change it) it
    is set aside until they are killed and reaped."""
    workers = multiprocessing.active_children()
    if not workers:
        return
    main_thread = threading.current_thread() is threading.main_thread()
    handler = signal.signal(signal.SIGCHLD, signal.SIG_DFL) if main_thread else None
    try:
        for worker in workers:
            worker.kill()
        for worker in workers:
            worker.join(timeout=10)
    finally:
        if handler is not None:
            signal.signal(signal.SIGCHLD, handler)
