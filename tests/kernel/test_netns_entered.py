"""netns.entered on a real kernel: a thread returns to its own netns through a
descriptor it keeps (one per thread, closed when the thread ends, never one per call), a
nested body returns to the outer body's netns, and a body that raises still moves back."""

from __future__ import annotations

import os
import threading

from kernel_sandbox import netns_factory

from nodeagent import netns


def nsfs_fds() -> set[str]:
    """This process's open descriptors of network namespaces."""
    found = set()
    for fd in os.listdir("/proc/self/fd"):
        try:
            if os.readlink(f"/proc/self/fd/{fd}").startswith("net:"):
                found.add(fd)
        except FileNotFoundError:  # the listing's own descriptor
            pass
    return found


def test_entered_nests_moves_back_on_errors_and_keeps_one_descriptor_per_thread(monkeypatch):
    opened = []  # the thread's own netns, opened to come back to it
    real_open = os.open

    def counting_open(path, *args, **kwargs):
        if path == "/proc/thread-self/ns/net" and threading.current_thread().name == "entering":
            opened.append(path)
        return real_open(path, *args, **kwargs)
    monkeypatch.setattr(os, "open", counting_open)
    with netns_factory() as make:
        a, b = make(), make()
        home, seen = netns.current_cookie(), {}
        cookies = {"a": a.cookie, "b": b.cookie}  # (this thread's first entered(): its own descriptor, kept)

        def body() -> None:
            with netns.entered(a.path):
                seen["a"] = netns.current_cookie()
                with netns.entered(b.path):
                    seen["b"] = netns.current_cookie()
                seen["a again"] = netns.current_cookie()
            seen["home"] = netns.current_cookie()
            try:
                with netns.entered(a.path):
                    raise RuntimeError("in a")
            except RuntimeError:
                pass
            seen["after an error"] = netns.current_cookie()
            kept = nsfs_fds()
            for _ in range(50):
                with netns.entered(a.path):
                    pass
            seen["descriptors added by 50 more"] = len(nsfs_fds() - kept)

        before = nsfs_fds()
        thread = threading.Thread(target=body, name="entering")
        thread.start()
        thread.join()
        assert seen == {**cookies, "a again": cookies["a"], "home": home, "after an error": home,
                        "descriptors added by 50 more": 0}
        assert len(opened) == 2  # its own, once; where the nested body came back to
        assert nsfs_fds() == before  # the thread's kept descriptor went with it
        assert netns.current_cookie() == home  # and this thread never moved
