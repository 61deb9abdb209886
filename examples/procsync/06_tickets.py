"""6.锁 抢票 — ten people look up and buy tickets kept in a JSON file "db".

Everyone may look (search, no lock), but buying is a read-modify-write of the file:
without the Lock two buyers read the same count and the shop oversells. With it,
exactly as many tickets are sold as the db had, and the count ends at 0, never below.

The db is the JSON file ``db`` in the current directory, or the path given as the
first argument; when it does not exist it is created with ``{"count": TICKETS}``
(second argument, default 3).

Changes from the notes: ``''count''`` -> ``"count"``, missing parentheses; the file is
written under a temporary name and then swapped in (``os.replace``), so that a search,
which takes no lock, never reads a half-written file; the main process waits for
everybody and prints what is left.

    python examples/multiprocessing/06_tickets.py [DB_PATH] [TICKETS]
    python examples/procsync/06_tickets.py [DB_PATH] [TICKETS]   # the same, on procsync
"""

import json
import os
import sys
import time
from multiprocessing import Process

# isort: split
# The next line is the only one that differs between examples/multiprocessing/ and
# examples/procsync/.
from procsync import Lock

# EXAMPLE_SPEED=10 makes every sleep 10 times shorter (the tests use it).
SPEED = float(os.environ.get("EXAMPLE_SPEED", "1"))
DB = sys.argv[1] if len(sys.argv) > 1 else "db"
TICKETS = int(sys.argv[2]) if len(sys.argv) > 2 else 3


def search(i):
    with open(DB) as f:
        count_dic = json.load(f)
    time.sleep(0.2 / SPEED)
    print("person %s 余票:%s张" % (i, count_dic["count"]), flush=True)


def buy(i):
    with open(DB) as f:
        count_dic = json.load(f)
    time.sleep(0.2 / SPEED)
    if count_dic["count"] > 0:
        count_dic["count"] -= 1
        print("person %s购票成功" % i, flush=True)
    time.sleep(0.2 / SPEED)
    tmp = "%s.%s" % (DB, os.getpid())
    with open(tmp, "w") as f:
        json.dump(count_dic, f)
    os.replace(tmp, DB)


def task(i, lock):
    search(i)
    lock.acquire()
    buy(i)
    lock.release()


if __name__ == "__main__":
    if not os.path.exists(DB):
        with open(DB, "w") as f:
            json.dump({"count": TICKETS}, f)
    lock = Lock()
    people = []
    for i in range(10):
        p = Process(target=task, args=(i, lock))
        p.start()
        people.append(p)
    for p in people:
        p.join()
    with open(DB) as f:
        print("余票:%s张" % json.load(f)["count"], flush=True)
