"""A terminal progress bar fed by :class:`~onnxprune.progress.Progress` events (embedded and remote runs)."""

from __future__ import annotations

import sys

from tqdm import tqdm

from onnxprune.progress import Progress


class StageBar:
    """One tqdm bar over the whole job; the description shows the current stage. Silent when not a TTY."""

    def __init__(self, desc: str = "onnxprune") -> None:
        self._bar = tqdm(total=100, desc=desc, unit="%", leave=False, disable=not sys.stderr.isatty(),
                         bar_format="{desc}: {percentage:3.0f}%|{bar}| {postfix}")

    def __call__(self, event: Progress) -> None:
        self._bar.set_postfix_str(event.message or event.stage, refresh=False)
        self._bar.n = int(round(100 * event.fraction)) if event.stage == "done" else self._bar.n
        self._bar.refresh()

    def close(self) -> None:
        self._bar.close()

    def __enter__(self) -> StageBar:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
