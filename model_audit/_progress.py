"""Progress bars: tqdm on stderr, only when asked for and stderr is a terminal."""
from __future__ import annotations

import sys
from typing import Iterable, Iterator, Optional, TypeVar
from tqdm import tqdm

T = TypeVar("T")


def progress_bar(items: Iterable[T], *, total: Optional[int] = None, desc: str = "",
                 enabled: bool = False) -> Iterator[T]:
    if not enabled or not sys.stderr.isatty():
        yield from items
        return
    with tqdm(items, total=total, desc=desc, leave=False, file=sys.stderr,
              dynamic_ncols=True) as bar:
        yield from bar
