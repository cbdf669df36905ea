"""Tiny plain-TCP beanstalkd session for the quickstart: put, reserve, delete, via the tunnel.

Usage: python scripts/demo_client.py HOST PORT
"""

import socket
import sys


def main() -> None:
    host, port = sys.argv[1], int(sys.argv[2])
    with socket.create_connection((host, port), timeout=5) as s:
        f = s.makefile("rb")

        def call(data: bytes) -> bytes:
            s.sendall(data)
            line = f.readline()
            print(">", data.split(b"\r\n")[0].decode(), " <", line.decode().strip())
            if line.startswith(b"RESERVED"):
                print("  body:", f.read(int(line.split()[2]) + 2)[:-2])
            return line

        call(b"use quickstart\r\n")
        call(b"put 0 0 60 5\r\nhello\r\n")
        call(b"watch quickstart\r\n")
        job = call(b"reserve-with-timeout 5\r\n").split()[1]
        call(b"delete " + job + b"\r\n")


if __name__ == "__main__":
    main()
