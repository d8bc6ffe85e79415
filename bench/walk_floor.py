"""The floor for any Python merge: step over every record header of the files, nothing else.

    python bench/walk_floor.py FILES...

One struct.unpack_from per record to find the next one; the files are mapped, not read; no
timestamp is computed, nothing is kept, merged or written. merge_vs_mergecap.py times this
next to ddump and mergecap: whatever a pure-Python merge does per record comes on top of it.
"""

from __future__ import annotations

import mmap
import struct
import sys


def walk(buf: mmap.mmap) -> int:
    """How many records follow the 24-byte global header."""
    unpack = struct.Struct("<I").unpack_from
    pos, last, count = 24, len(buf) - 16, 0
    while pos <= last:
        pos += 16 + unpack(buf, pos + 8)[0]
        count += 1
    return count


def main() -> None:
    total = 0
    for path in sys.argv[1:]:
        with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
            total += walk(m)
    print(total)


if __name__ == "__main__":
    main()
