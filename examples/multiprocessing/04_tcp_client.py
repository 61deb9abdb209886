"""5. socket tcp client for 04_tcp_server.py.

Receives b"hello", prints it, answers b"world" — a number of rounds (argv or
EXAMPLE_ROUNDS, default 3) instead of the notes' ``while 1``. Fixed from the notes:
``sk.conn`` -> ``sk.connect``, missing parentheses.

    python examples/multiprocessing/04_tcp_client.py [PORT] [ROUNDS]
"""

import os
import socket
import sys

port = int(sys.argv[1] if len(sys.argv) > 1 else os.environ.get("EXAMPLE_PORT", "9090"))
rounds = int(sys.argv[2] if len(sys.argv) > 2 else os.environ.get("EXAMPLE_ROUNDS", "3"))

sk = socket.socket()
sk.connect(("127.0.0.1", port))
for _ in range(rounds):  # the notes: while 1
    print(sk.recv(1024), flush=True)
    sk.send(b"world")
sk.close()
