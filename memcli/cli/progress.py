"""Progress displays on stderr (a terminal only): a spinner, what is being done, a bar and text
columns. Transient: nothing of them stays on the terminal. While one is shown, stderr lines
(`output.say`) print above it and a model's loading note goes into it."""

from __future__ import annotations

import os
import time

from memcli.base.text import shown
from memcli.cli import output
from memcli.cli.output import plural, say


def eta(seconds: float) -> str:
    seconds = int(seconds + 0.5)
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}" if seconds >= 3600 else f"{seconds // 60}:{seconds % 60:02d}"


class LiveProgress:
    """A Rich progress display with text columns `fields`; enabled on a terminal (or as told)."""

    active: "LiveProgress | None" = None  # the display being shown (the loading note goes there)

    def __init__(self, fields: tuple[str, ...], enabled: bool | None = None):
        from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn

        err = output.console()
        self.fields = fields
        self.progress = Progress(
            SpinnerColumn(),
            TextColumn("{task.description}", markup=False),
            BarColumn(),
            *(TextColumn(f"{{task.fields[{name}]}}", markup=False) for name in fields),
            console=err,
            transient=True,
            disable=not (err.is_terminal if enabled is None else enabled),
        )
        self.task = None

    def __enter__(self):
        self.progress.__enter__()
        self.task = self.progress.add_task("starting", total=None, **dict.fromkeys(self.fields, ""))
        if not self.progress.disable:
            LiveProgress.active = self
            output.live(self.progress.console)
        return self

    def __exit__(self, *exc) -> None:
        LiveProgress.active = None
        output.live(None)
        self.progress.__exit__(*exc)

    def loading(self, model: str, device: str) -> None:
        name = shown(model)
        name = name if len(name) <= 40 else "…" + name[-39:]
        self.progress.update(self.task, description=f"loading {name} on {device}…", refresh=True)


class InjectProgress(LiveProgress):
    """inject's display: "file k of n", chunks, tokens/s and an ETA from the file's position (bytes,
    or pages of a PDF). Rate and ETA count from this run's first chunk of the file (a resumed file's
    skipped part is not work done) and use the file's whole average, so the ETA does not jump with
    one slow chunk."""

    def __init__(self, enabled: bool | None = None):
        super().__init__(("chunks", "rate", "eta"), enabled)

    def __call__(self, event) -> None:
        if self.task is None:
            return
        if event.kind == "file":
            name = os.path.basename(shown(event.path)) or shown(event.path)
            if len(name) > 40:
                name = "…" + name[-39:]
            self.progress.reset(self.task, total=None, completed=0, chunks="", rate="", eta="",
                                description=f"file {event.file_index:,} of {event.files_total:,}: {name}")
            self.progress.refresh()
        elif event.kind == "chunk":
            update: dict = {"chunks": plural(event.chunks, "chunk"), "rate": "", "eta": ""}
            if event.seconds > 0:
                update["rate"] = f"{event.tokens / event.seconds:,.0f} tok/s"
            if event.total:
                update.update(total=event.total, completed=event.done)
                progressed = event.done - event.start
                if progressed > 0 and event.seconds > 0:
                    update["eta"] = "ETA " + eta((event.total - event.done) * event.seconds / progressed)
            self.progress.update(self.task, **update)


class EvalProgress(LiveProgress):
    """eval retention's progress: "episode k of n", a bar over every injected chunk and question,
    and an ETA from the run's average so far (inject's conventions). Off a terminal: one line per
    finished episode on stderr, with the time so far and the ETA."""

    def __init__(self, enabled: bool | None = None):
        super().__init__(("steps", "eta"), enabled)
        self.started: float | None = None
        self.said = 0  # episodes said off a terminal

    def __call__(self, done: int, total: int, episode: int, episodes: int) -> None:
        now = time.monotonic()
        if self.started is None or done == 0:
            self.started = now
        elapsed = now - self.started
        left = eta((total - done) * elapsed / done) if done and elapsed > 0 else ""
        finished = episode - (done < total)  # episodes complete (the last one when all is done)
        if self.progress.disable:
            if finished > self.said:
                self.said = finished
                say(f"episode {finished} of {episodes} done ({eta(elapsed)} so far"
                    + (f", ETA {left})" if done < total else ")"))
            return
        description = f"episode {episode} of {episodes}"
        changed = description != self.progress.tasks[0].description
        self.progress.update(self.task, total=total, completed=done, description=description,
                             steps=f"{done:,}/{total:,} steps", eta=f"ETA {left}" if left else "", refresh=changed)
