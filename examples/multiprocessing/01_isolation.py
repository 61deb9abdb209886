"""1.进程之间的数据隔离问题 — processes do not share memory.

A hundred children each run ``n = n - 1`` on the global ``n``, and the parent still
prints 100: every child changed its *own copy* of ``n``. This program is
deliberately "wrong" — that is the lesson: a global changed in a child is invisible
to every other process, so processes that must share data need another channel
(a file, a socket, a server).

The procsync version is the way out: ``n`` is a ``procsync.Value`` kept in the
server, the one ``n`` of every process, so the parent prints 0. Unlike the other
examples it changes more than its import line, because a shared number is an object,
not a global: ``n = Value("i", 100)``, ``n.value`` where the notes say ``n``, the
read-modify-write under ``n.get_lock()``, and ``n`` handed to each child in
``args`` — just what ``multiprocessing.Value`` asks for too.

    python examples/multiprocessing/01_isolation.py      # prints 100
    python examples/procsync/01_isolation.py             # prints 0
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
