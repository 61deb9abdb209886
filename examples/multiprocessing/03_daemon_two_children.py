"""2.守护进程 例二 — a daemon lives as long as the main *code*, not the other children.

``func1`` is an ordinary child (3 s, then "wahaha"); ``func2`` is a daemon printing
"in func2" every 0.5 s in an endless loop. After 1 s the main process prints
"主进程" and its code is done: the daemon stops at once, while the main process
still waits for ``func1``, which prints "wahaha" 2 s later. The daemon's
``while True`` is bounded by exactly that: it ends with the main process's code.

应用: 报活 — a daemon process reporting "I'm alive" for its main process.

    python examples/multiprocessing/03_daemon_two_children.py
"""

import os
import time
from multiprocessing import Process

# EXAMPLE_SPEED=10 makes every sleep 10 times shorter (the tests use it).
SPEED = float(os.environ.get("EXAMPLE_SPEED", "1"))


def func1():
    print("begin", flush=True)
    time.sleep(3 / SPEED)
    print("wahaha", flush=True)


def func2():
    while True:  # endless, but a daemon: it ends when the main process's code ends
        print("in func2", flush=True)
        time.sleep(0.5 / SPEED)


if __name__ == "__main__":
    Process(target=func1).start()
    p = Process(target=func2)
    p.daemon = True
    p.start()
    time.sleep(1 / SPEED)
    print("主进程", flush=True)
