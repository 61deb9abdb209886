"""8.事件 — an Event is a flag: wait() blocks while it is False.

is_set() shows the flag, set() makes it True, clear() makes it False. Prints False,
True, False. The notes' ``e.wait()`` on a cleared flag, which blocks forever, is
left out so that the program ends; ``wait(timeout=10)`` shows the timeout instead.

    python examples/multiprocessing/09_event_basics.py
    python examples/procsync/09_event_basics.py      # the same, on procsync
"""

import os

# isort: split
# The next line is the only one that differs between examples/multiprocessing/ and
# examples/procsync/.
from procsync import Event

# EXAMPLE_SPEED=10 makes every sleep 10 times shorter (the tests use it).
SPEED = float(os.environ.get("EXAMPLE_SPEED", "1"))

if __name__ == "__main__":
    e = Event()
    print(e.is_set(), flush=True)  # 在事件的创建之初默认是False
    e.set()  # 将标志设置为True
    print(e.is_set(), flush=True)
    e.wait()  # 相当于什么都没有做pass,因为当前标志是True,非阻塞状态
    e.clear()  # 将标志设置为False
    # e.wait()  # 永远阻塞 (left out: the program would never end)
    # 如果信号在阻塞10s之内变为True,那么不继续阻塞直接pass,
    # 如果阻塞10s之后代码继续执行,但是状态没有变.
    e.wait(timeout=10 / SPEED)
    print(e.is_set(), flush=True)  # 无论前面的wait的timeout是否通过,我的状态都不会因此改变.
