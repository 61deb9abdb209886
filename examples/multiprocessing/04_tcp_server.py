"""5. socket tcp server — one process per client.

A plain socket server talks to one client at a time; starting a Process per
accepted connection lets it talk to many at once. Each ``talk`` sends b"hello" and
prints what the client answers, until the client leaves.

Changes from the notes: ``scoket`` -> ``socket``, missing parentheses; it listens on
127.0.0.1 and a port from argv or EXAMPLE_PORT (default 9090 as in the notes; 0 picks a
free port, printed on the first line); it serves a number of clients (argv or
EXAMPLE_CLIENTS, default 3) and then exits instead of ``while 1``.

    python examples/multiprocessing/04_tcp_server.py [PORT] [CLIENTS]
    python examples/multiprocessing/04_tcp_client.py [PORT] [ROUNDS]    # in other shells
"""

import os
import socket
import sys
from multiprocessing import Process


def talk(conn):
    try:
        while 1:
            conn.send(b"hello")
            msg = conn.recv(1024)
            if not msg:  # the client has closed the connection
                break
            print(msg, flush=True)
    except ConnectionError:  # the client left without saying goodbye
        pass
    finally:
        conn.close()


if __name__ == "__main__":
    port = int(sys.argv[1] if len(sys.argv) > 1 else os.environ.get("EXAMPLE_PORT", "9090"))
    clients = int(sys.argv[2] if len(sys.argv) > 2 else os.environ.get("EXAMPLE_CLIENTS", "3"))
    sk = socket.socket()
    sk.bind(("127.0.0.1", port))
    sk.listen()
    print("listening on 127.0.0.1:%s" % sk.getsockname()[1], flush=True)
    children = []
    try:
        for _ in range(clients):  # the notes: while 1
            conn, addr = sk.accept()
            p = Process(target=talk, args=(conn,))
            p.start()
            children.append(p)
            conn.close()  # the child has its own copy of the connection
    finally:
        sk.close()
    for p in children:
        p.join()
