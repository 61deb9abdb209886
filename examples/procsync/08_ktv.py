"""7.信号量 KTV — ten people, a room for three: Semaphore(3).

Each person takes a key (acquire), sings 1-4 s, and gives it back (release); never
more than three are inside at once. The prints come right after entering and right
before leaving, so in the output, at every line, at most three people are inside.

    python examples/multiprocessing/08_ktv.py
    python examples/procsync/08_ktv.py           # the same, on procsync
"""

import os
import random
import time
from multiprocessing import Process

# isort: split
# The next line is the only one that differs between examples/multiprocessing/ and
# examples/procsync/.
from procsync import Semaphore

# EXAMPLE_SPEED=10 makes every sleep 10 times shorter (the tests use it).
SPEED = float(os.environ.get("EXAMPLE_SPEED", "1"))


def ktv(num, sem):
    sem.acquire()
    print("person %s 进了KTV" % num, flush=True)
    time.sleep(random.randint(1, 4) / SPEED)
    print("person %s 出来了" % num, flush=True)
    sem.release()


if __name__ == "__main__":
    sem = Semaphore(3)
    for i in range(10):
        p = Process(target=ktv, args=(i, sem))
        p.start()
