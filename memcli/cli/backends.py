"""The backend a command goes through, chosen once per command (`choose`):

* a running server of this user's (`memcli.server.remote.RemoteBackend`), or one started in the
  background for commands that run a model (`start`), unless `--no-server`, config
  `server = false` or MEMCLI_SERVER=0;
* else the library in this process (`memcli.app.local.LocalBackend`): also when no server can be
  started, or what answers on the socket is not this user's server (one line says why).

Either way the model's use is shown alike (`ModelNotes`): the CPU warning once per process when the
device was left to choose and it is a CPU, and the loading note while weights load (in the progress
display, or on a terminal as one line).
"""

from __future__ import annotations

from memcli.base.text import shown
from memcli.cli import output
from memcli.cli.progress import LiveProgress
from memcli.wire import ModelUse

CPU_WARNING = ("no CUDA GPU found; running on the CPU (slow). To silence this, set the device: "
               "memcli config set device cpu (or --device cpu, MEMCLI_DEVICE=cpu)")


class ModelNotes:
    """What a command says about the model its work runs on (see the module docstring)."""

    warned = False  # the CPU warning is said once per process

    def __init__(self, settings):
        self.settings = settings

    def __call__(self, use: ModelUse) -> None:
        from memcli.loading.catalog import made_for_cpu

        if (self.settings.device == "auto" and use.device == "cpu" and not ModelNotes.warned
                and not made_for_cpu(use.model)):
            ModelNotes.warned = True
            output.say(CPU_WARNING, style="yellow")
        if not use.loading:
            return
        if LiveProgress.active is not None:
            LiveProgress.active.loading(use.model, use.device)  # shown in the display, gone after it
        elif output.console().is_terminal:
            output.say(f"loading {shown(use.model)} on {use.device}...", style="dim")


def choose(settings, flags: dict, start: bool):
    """The backend of this command (see the module docstring); `start`: start a server when none
    runs (commands that run a model; pool info only uses one that runs)."""
    from memcli.server.launch import open_backend

    notes = ModelNotes(settings)
    return open_backend(settings, flags, start=start, say=output.say, on_model=notes,
                        on_load=lambda model, device: notes(ModelUse(model, device, True)))


def local(settings):
    """The library in this process (its models load on first use): what `eval` measures."""
    from memcli.app.local import LocalBackend

    def make():
        from memcli.app.api import Memcli

        notes = ModelNotes(settings)
        return Memcli(settings, on_load=lambda model, device: notes(ModelUse(model, device, True)))

    return LocalBackend(make=make)
