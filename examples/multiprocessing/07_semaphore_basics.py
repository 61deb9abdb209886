"""7.信号量 — a Semaphore(3) has three keys.

Three acquire() calls get through (1, 2, 3); the fourth would wait forever because
nobody gives a key back — here it waits with a timeout and prints False. Once a key
is given back, the fourth gets through (4). Fixed from the notes: ``sef`` -> ``sem``.

信号量的本质: 多把钥匙对应一把锁, lock + count计数.

    python examples/multiprocessing/07_semaphore_basics.py
    python examples/procsync/07_semaphore_basics.py      # the same, on procsync
"""

import os

# isort: split
# The next line is the only one that differs between examples/multiprocessing/ and
# examples/procsync/.
from multiprocessing import Semaphore

# EXAMPLE_SPEED=10 makes every sleep 10 times shorter (the tests use it).
SPEED = float(os.environ.get("EXAMPLE_SPEED", "1"))

if __name__ == "__main__":
    sem = Semaphore(3)  # 信号量
    sem.acquire()
    print(1, flush=True)
    sem.acquire()
    print(2, flush=True)
    sem.acquire()
    print(3, flush=True)
    # 阻塞,因为只有三把钥匙,且上面没有还钥匙的过程: a timeout makes it give up (False)
    print(sem.acquire(timeout=1 / SPEED), flush=True)
    sem.release()  # 还一把钥匙
    sem.acquire()  # now there is a key for the fourth
    print(4, flush=True)
