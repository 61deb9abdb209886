"""1.进程之间的数据隔离问题 — processes do not share memory.

A hundred children each run ``n = n - 1`` on the global ``n``, and the parent still
prints 100: every child changed its *own copy* of ``n``. This program is
deliberately "wrong" — that is the lesson: a global changed in a child is invisible
to every other process, so processes that must share data need another channel
(a file, a socket, a server).

There is no procsync version of this one yet: its procsync counterpart would share
the counter through ``procsync.Value``, which does not exist yet.

    python examples/multiprocessing/01_isolation.py      # prints 100
"""

from multiprocessing import Process

n = 100


def func():
    global n
    n = n - 1
    return 6666


if __name__ == "__main__":
    nl = []
    for _ in range(100):
        p = Process(target=func)
        p.start()
        nl.append(p)
    for p in nl:
        p.join()
    print(n, flush=True)  # 100, not 0: the children's n are not this n
