"""2.守护进程 例一 — a daemon child ends when the main process's code ends.

The child prints "begin", sleeps 3 s and would print "wahaha"; the main process
prints "主进程" after 1 s and ends, which ends its daemon child: "wahaha" never
appears.

    python examples/multiprocessing/02_daemon.py          # begin / 主进程
    EXAMPLE_SPEED=10 python examples/multiprocessing/02_daemon.py   # 10x shorter sleeps
"""

import os
import time
from multiprocessing import Process

# EXAMPLE_SPEED=10 makes every sleep 10 times shorter (the tests use it).
SPEED = float(os.environ.get("EXAMPLE_SPEED", "1"))


def func():
    print("begin", flush=True)
    time.sleep(3 / SPEED)
    print("wahaha", flush=True)


if __name__ == "__main__":
    p = Process(target=func)
    # 守护进程的属性,默认是False,如果设置成True,就表示设置这个子进程为一个守护进程.
    # 设置守护进程的操作应该在开启子进程之前 (setting it after start() raises).
    p.daemon = True
    p.start()
    time.sleep(1 / SPEED)
    print("主进程", flush=True)
