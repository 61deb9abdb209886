"""6.锁 — a Lock has one key: acquire() takes it, release() gives it back.

The notes' two snippets, then what "阻塞" means: while the key is out, acquire()
waits — here with a timeout so that the program ends, and then with a child
process that waits until the main process gives the key back.

Prints, in this order: 1111, 2222, False, "main: 还钥匙", "child: 拿到钥匙" (and
"child: 等钥匙" somewhere before that).

    python examples/multiprocessing/05_lock_basics.py
    python examples/procsync/05_lock_basics.py     # the same, on procsync
"""

import os
import time
from multiprocessing import Process

# isort: split
# The next line is the only one that differs between examples/multiprocessing/ and
# examples/procsync/.
from multiprocessing import Lock

# EXAMPLE_SPEED=10 makes every sleep 10 times shorter (the tests use it).
SPEED = float(os.environ.get("EXAMPLE_SPEED", "1"))


def child(lock):
    print("child: 等钥匙", flush=True)
    lock.acquire()  # blocks until the main process gives the key back
    print("child: 拿到钥匙", flush=True)
    lock.release()


if __name__ == "__main__":
    lock = Lock()  # 创造了一把锁
    lock.acquire()  # 获取了这把锁的钥匙
    lock.release()  # 归还这把锁的钥匙

    # 加锁就是谁先拿到钥匙谁先进.
    lock.acquire()  # 拿钥匙
    print(1111, flush=True)
    lock.release()  # 还钥匙
    lock.acquire()  # 阻塞,如果上面没有还钥匙就会阻塞
    print(2222, flush=True)

    # The key is out now, so one more acquire() would block forever (a Lock is not
    # reentrant); with a timeout it gives up and returns False.
    print(lock.acquire(timeout=1 / SPEED), flush=True)

    # Another process that wants the key waits until it is given back.
    p = Process(target=child, args=(lock,))
    p.start()
    time.sleep(1 / SPEED)
    print("main: 还钥匙", flush=True)
    lock.release()
    p.join()
