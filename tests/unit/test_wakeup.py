"""Wake-ups: an idle waiter is woken by new work at once, on SQLite (FIFOs) and PostgreSQL."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

from koubou_mcp import queue
from koubou_mcp.config import Settings
from koubou_mcp.models import utcnow
from koubou_mcp.store import Store
from koubou_mcp.wakeup import FifoWakeup, SelfPipe


def test_enqueue_wakes_a_waiting_listener(store: Store, store_settings: Settings) -> None:
    listener = store.wakeup.listen("waiter")
    try:
        assert not listener.wait(0.05), "nothing happened yet"
        woke: list[float] = []

        def wait() -> None:
            if listener.wait(10):
                woke.append(time.monotonic())

        waiter = threading.Thread(target=wait)
        waiter.start()
        sent = time.monotonic()
        queue.enqueue(store, queue.validate_request(store_settings, "wake up"), store_settings,
                      utcnow())
        waiter.join(timeout=15)
        assert woke, "the listener was not woken"
        assert woke[0] - sent < 5, "woken by the notification, not by the 10 s timeout"
    finally:
        listener.close()


def test_poke_wakes_the_listener_itself(store: Store) -> None:
    listener = store.wakeup.listen("self")
    try:
        listener.poke()
        assert listener.wait(5)
        assert not listener.wait(0.05), "a poke is consumed once"
    finally:
        listener.close()


def test_a_pipe_nobody_reads_any_more_is_removed(tmp_path: Path) -> None:
    wakeup = FifoWakeup(tmp_path / "wake")
    listener = wakeup.listen("gone")
    path = listener.path
    os.close(listener.fileno())  # its owner died without cleaning up
    assert path.exists()
    wakeup.notify()
    assert not path.exists()


def test_notify_with_no_listeners_is_harmless(tmp_path: Path) -> None:
    FifoWakeup(tmp_path / "never-created").notify()


def test_a_self_pipe_wakes_its_own_wait_and_is_harmless_once_closed() -> None:
    pipe = SelfPipe()
    assert not pipe.wait(0.01), "nothing happened yet"
    pipe.poke()
    pipe.poke()
    assert pipe.wait(5)
    assert not pipe.wait(0.01), "both pokes were consumed by one wake-up"
    threading.Timer(0.05, pipe.poke).start()
    assert pipe.wait(5)
    pipe.close()
    pipe.poke()  # after close: no error (a late signal handler)
    pipe.close()
