"""Processes a run started go away with it, even when it is killed.

A local Ray cluster shares the fate of the driver that started it, except Ray's DashboardAgent
and RuntimeEnvAgent: after a SIGKILL of the driver they spend a minute trying to tell the dead
GCS that the raylet died, still listening on their ports. ``reap_on_exit()`` starts this file as
a small watcher (its own session, so neither Ctrl-C nor the driver's death reaches it) that notes
the driver's descendants every second and, once the driver is gone, kills those still alive.
Run as a script, it imports only psutil.
"""
from __future__ import annotations

import os
import subprocess
import sys
import time

import psutil

GRACE_S = 2.0  # time for what the driver started to exit on its own (Ray's fate sharing takes < 1 s)
_started: set[int] = set()


def reap_on_exit() -> None:
    """Watch this process from a separate one and kill what it left behind when it ends (once per process)."""
    if os.getpid() in _started:
        return
    _started.add(os.getpid())
    subprocess.Popen([sys.executable, __file__, str(os.getpid())], start_new_session=True, close_fds=True,
                     stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def watch(pid: int, interval: float = 1.0) -> list[int]:
    """Until process ``pid`` ends, note its descendants; then kill those still running. Returns their pids."""
    try:
        driver = psutil.Process(pid)
    except psutil.NoSuchProcess:
        return []
    seen: dict[int, psutil.Process] = {}
    while _alive(driver):
        try:
            seen.update((p.pid, p) for p in driver.children(recursive=True) if p.pid != os.getpid())
        except psutil.Error:
            pass  # it ended while we looked
        time.sleep(interval)
    time.sleep(GRACE_S)
    left = [p for p in seen.values() if p.is_running()]  # is_running also checks the pid was not reused
    for process in left:
        try:
            process.kill()
        except psutil.Error:
            pass
    return [p.pid for p in left]


def _alive(process: psutil.Process) -> bool:
    try:
        return process.is_running() and process.status() != psutil.STATUS_ZOMBIE  # a killed child not yet waited for
    except psutil.Error:
        return False


if __name__ == "__main__":
    watch(int(sys.argv[1]))
