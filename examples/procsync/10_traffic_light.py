"""8.事件 红绿灯模型 — a traffic light process and cars that wait for green.

The light switches every 2 s: green sets the Event, red clears it. A car that finds
the light red prints "等待" and waits; it passes when the light turns green. A police
car waits at most 0.5 s and passes anyway. Twenty vehicles (first argument) come one
after another, 0 or 2 s apart.

Changes from the notes: the light process is started (the notes forget .start());
it is a daemon, so it ends with the main process, which waits for every car; each car
passes once (the notes loop forever); when turning red, the light clears the flag
*before* printing "红灯亮", so that no car passes after the light has said red.

    python examples/multiprocessing/10_traffic_light.py [CARS]
    python examples/procsync/10_traffic_light.py [CARS]   # the same, on procsync
"""

import os
import random
import sys
import time
from multiprocessing import Process

# isort: split
# The next line is the only one that differs between examples/multiprocessing/ and
# examples/procsync/.
from procsync import Event

# EXAMPLE_SPEED=10 makes every sleep 10 times shorter (the tests use it).
SPEED = float(os.environ.get("EXAMPLE_SPEED", "1"))
CARS = int(sys.argv[1]) if len(sys.argv) > 1 else 20


# 控制交通灯的过程
def traffic_light(e):
    print("\033[1;31m 红灯亮\033[0m", flush=True)
    while 1:  # a daemon process: it ends when the main process's code ends
        time.sleep(2 / SPEED)
        if e.is_set():
            e.clear()
            print("\033[1;31m 红灯亮\033[0m", flush=True)
        else:
            print("\033[1;32m 绿灯亮\033[0m", flush=True)
            e.set()


# 车 等或者通过
def car(id, e):
    if not e.is_set():
        print("car %s 等待" % id, flush=True)
        e.wait()
    print("car %s 通过" % id, flush=True)


def police_car(id, e):
    if not e.is_set():
        e.wait(timeout=0.5 / SPEED)
    print("police_car %s通过" % id, flush=True)


# 主进程 启动交通控制灯 启动车的进程
if __name__ == "__main__":
    e = Event()
    light = Process(target=traffic_light, args=(e,))
    light.daemon = True
    light.start()
    nl = [police_car, car]
    cars = []
    for i in range(CARS):
        p = Process(target=random.choice(nl), args=(i, e))
        p.start()
        cars.append(p)
        time.sleep(random.randrange(0, 3, 2) / SPEED)
    for p in cars:
        p.join()
