"""Micro-benchmarks behind two data-path choices, in CPU seconds per GiB (Linux).

`python benchmarks/micro.py hash`: how a writer should read a chunk it hashes (and copies on).
A fresh mmap window per 1 MiB chunk against `preadv` into one reused buffer
(`fileio.ChunkReader`), each alone and with the kernel's copy (`copy_file_range`) into a new
file beside it, as a writer copies a segment into the data.

`python benchmarks/micro.py intake`: what taking a body off a loopback socket into a file costs,
with `recv` + `write` (what waitress and the spool do) against `splice` socket → pipe → file.

Each case runs `--reps` times (medians printed, with the spread); the file and the body are
1 GiB unless `--size` says otherwise. Files go to `--dir` (default: this machine's temp dir;
put it on the disk the server uses). Only CPU time of this process is counted: the kernel's
writeback happens elsewhere.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import hashlib
import mmap
import multiprocessing
import os
import resource
import socket
import statistics
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

CHUNK = 1024 * 1024
F_SETPIPE_SZ = 1031


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def report(name: str, runs: list[float], size: int) -> None:
    per_gib = [r * (1 << 30) / size for r in runs]
    print(
        f"{name:40s} {statistics.median(per_gib):6.3f} s/GiB  ({min(per_gib):.3f}-{max(per_gib):.3f})"
    )


@contextlib.contextmanager
def scratch(directory: Path, name: str) -> Iterator[int]:
    path = directory / name
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        yield fd
    finally:
        os.close(fd)
        path.unlink()


def hash_cases(directory: Path, size: int, reps: int) -> None:
    source = directory / "micro-source.bin"
    with open(source, "wb") as out:
        block = os.urandom(CHUNK)
        for _ in range(size // CHUNK):
            out.write(block)
    src = os.open(source, os.O_RDONLY)
    buffer = bytearray(CHUNK)
    view = memoryview(buffer)

    def mapped(offset: int) -> Callable[[hashlib._Hash], None]:
        def update(digest: hashlib._Hash) -> None:
            with (
                mmap.mmap(src, CHUNK, offset=offset, access=mmap.ACCESS_READ) as window,
                memoryview(window) as chunk,
            ):
                digest.update(chunk)

        return update

    def read(offset: int) -> Callable[[hashlib._Hash], None]:
        def update(digest: hashlib._Hash) -> None:
            os.preadv(src, [buffer], offset)
            digest.update(view)

        return update

    try:
        for name, reader in (("mmap window", mapped), ("preadv, reused buffer", read)):
            for copy in (False, True):
                runs = []
                for _ in range(reps):
                    with scratch(directory, "micro-copy.bin") as dst:
                        digest = hashlib.sha256()
                        start = cpu_seconds()
                        for offset in range(0, size, CHUNK):
                            reader(offset)(digest)
                            if copy:
                                os.copy_file_range(src, dst, CHUNK, offset, offset)
                        runs.append(cpu_seconds() - start)
                report(f"SHA-256 from {name}" + (" + copy_file_range" if copy else ""), runs, size)
    finally:
        os.close(src)
        source.unlink()


def _send(port: int, size: int) -> None:
    with socket.create_connection(("127.0.0.1", port)) as sock:
        block = os.urandom(CHUNK)
        for _ in range(size // CHUNK):
            sock.sendall(block)


def _receive(conn: socket.socket, dst: int, size: int, how: str) -> None:
    got = 0
    if how == "splice":
        r, w = os.pipe()
        fcntl.fcntl(w, F_SETPIPE_SZ, CHUNK)
        try:
            while got < size:
                n = os.splice(conn.fileno(), w, CHUNK)
                if not n:
                    break
                left = n
                while left:
                    left -= os.splice(r, dst, left)
                got += n
        finally:
            os.close(r)
            os.close(w)
        return
    while got < size:
        data = conn.recv(256 * 1024)
        if not data:
            break
        os.write(dst, data)
        got += len(data)


def intake_cases(directory: Path, size: int, reps: int) -> None:
    for how in ("recv + write", "splice"):
        runs = []
        for _ in range(reps):
            with socket.create_server(("127.0.0.1", 0)) as server:
                sender = multiprocessing.Process(target=_send, args=(server.getsockname()[1], size))
                sender.start()
                conn, _ = server.accept()
                with conn, scratch(directory, "micro-intake.bin") as dst:
                    start = cpu_seconds()
                    _receive(conn, dst, size, how)
                    runs.append(cpu_seconds() - start)
                sender.join()
        report(f"loopback body into a file: {how}", runs, size)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("case", choices=["hash", "intake"])
    parser.add_argument("--size", type=int, default=1 << 30, help="bytes (a multiple of 1 MiB)")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--dir", type=Path, default=Path(tempfile.gettempdir()))
    args = parser.parse_args()
    (hash_cases if args.case == "hash" else intake_cases)(args.dir, args.size, args.reps)


if __name__ == "__main__":
    main()
