"""Progress bars on stderr: one for the whole run and one for each file being sent (tqdm).

Bars are drawn only on a terminal (tqdm's `disable=None`), so scripts and CI logs get the result
lines alone. A file's bar follows the server's offset, not just the bytes written to the socket: a
chunk lost to a dropped connection is taken back off both bars when the upload resumes.
"""

from __future__ import annotations

import sys
import threading

from tqdm import tqdm

_BAR = {"unit": "B", "unit_scale": True, "unit_divisor": 1024, "dynamic_ncols": True}
NAME_WIDTH = 28


def _short(name: str) -> str:
    return name if len(name) <= NAME_WIDTH else "…" + name[-(NAME_WIDTH - 1) :]


class Progress:
    def __init__(self, total_bytes: int, files: int) -> None:
        self._lock = threading.Lock()
        label = "1 file" if files == 1 else f"{files} files"
        self.overall = tqdm(total=total_bytes, desc=label, position=0, disable=None, **_BAR)

    def file(self, name: str, size: int) -> FileBar:
        return FileBar(self, name, size)

    def add_bytes(self, delta: int) -> None:
        """Move the overall bar; negative when bytes sent before a drop are taken back."""
        with self._lock:
            if delta >= 0:
                self.overall.update(delta)
            else:
                self.overall.n += delta
                self.overall.refresh()

    def say(self, line: str) -> None:
        """A result line on stdout, printed above the bars."""
        with self._lock:
            tqdm.write(line, file=sys.stdout)

    def close(self) -> None:
        self.overall.close()


class FileBar:
    """One file: first the hashing of it, then its upload from the server's offset."""

    def __init__(self, progress: Progress, name: str, size: int) -> None:
        self.progress = progress
        self.name = _short(name)
        self.offset = 0
        self.bar = tqdm(total=size, desc=f"hash {self.name}", leave=False, disable=None, **_BAR)

    def hashed(self, count: int) -> None:
        self.bar.update(count)

    def sending_from(self, offset: int) -> None:
        """The upload starts (or starts again) at the server's `offset`."""
        self.bar.set_description_str(self.name, refresh=False)
        self.bar.reset()
        self.bar.update(offset)
        self.progress.add_bytes(offset - self.offset)
        self.offset = offset

    def sent(self, count: int) -> None:
        self.bar.update(count)
        self.progress.add_bytes(count)
        self.offset += count

    def waiting(self, why: str) -> None:
        self.bar.set_description_str(f"{self.name} ({why})")

    def close(self) -> None:
        self.bar.close()
