"""What every ``model-audit`` command shares: the click group that turns an
:class:`~model_audit.errors.AuditError` into a message and exit 2 and refuses outputs that are
inputs, the options that choose the model and the probe, and small helpers."""
from __future__ import annotations

import os
import sys
import traceback
from pathlib import Path
from typing import Any, Callable, Optional

import click

from .. import distributed
from ..core.layers import GRANULARITIES
from ..errors import AuditError, OutputError
from ..io.files import WRITTEN, overwritten_input
from ..options import DEVICES, AuditOptions


COMMANDS_WITH_MODEL = ("scan", "compare", "gate", "fix", "sanity")


def fail(message: str, exit_code: int = 2) -> click.ClickException:
    """A ClickException that prints ``Error: message`` and exits with ``exit_code``."""
    err = click.ClickException(message)
    err.exit_code = exit_code
    return err


class AuditGroup(click.Group):
    """Turns AuditError into a clean message and exit code 2, anywhere in a command.

    Before a command does any work, an output (``--out`` and the files written in it,
    ``--junit``, ``--summary``, ``--output``) that is one of the command's input paths, also
    through a symlink or a hard link, is refused. Ctrl-C prints what was written (normally
    nothing: outputs are written at the end, atomically) and exits 130, without a traceback.
    """

    #: Parameters naming what a command writes; every other path parameter is an input.
    OUTPUT_PARAMS = ("out", "junit", "summary", "output", "keep_damaged")
    #: Files the commands write inside their ``--out`` directory.
    OUT_FILES = ("audit.json", "report.html", "gate.json", "compare.json", "fix.json",
                 "sanity.json")
    #: The commands' default ``--out`` under ``reports/`` (from their input names' stems).
    DEFAULT_OUT = {"scan": "{checkpoint}", "gate": "gate-{checkpoint}",
                   "compare": "compare-{a}-vs-{b}", "fix": "fix-{checkpoint}",
                   "sanity": "sanity-{checkpoint}"}

    class Command(click.Command):
        """A command that refuses outputs that are its inputs before it runs."""

        def invoke(self, ctx: click.Context) -> Any:
            AuditGroup.refuse_outputs_over_inputs(ctx)
            # under torchrun: join the process group; rank 0 prints, the others are quiet
            with distributed.session(ctx.params.get("device") or "auto") as dctx:
                _quiet_unless_main(dctx)
                return super().invoke(ctx)

    command_class = Command

    @classmethod
    def refuse_outputs_over_inputs(cls, ctx: click.Context) -> None:
        if ctx.params.get("init"):  # `gate --init` writes only --policy, never over a file
            return
        paths = {k: v for k, v in ctx.params.items() if isinstance(v, Path)}
        inputs = {k: v for k, v in paths.items() if k not in cls.OUTPUT_PARAMS}
        if "out" in ctx.params and paths.get("out") is None and ctx.info_name in cls.DEFAULT_OUT:
            try:
                stems = {k: v.stem for k, v in inputs.items()}
                paths["out"] = Path("reports") / cls.DEFAULT_OUT[ctx.info_name].format(**stems)
            except KeyError:  # an input the default is made from is missing: the command says so
                pass
        for name in cls.OUTPUT_PARAMS:
            target = paths.get(name)
            if target is None:
                continue
            targets = [target] + ([target / f for f in cls.OUT_FILES] if name == "out" else [])
            clash = overwritten_input(targets, inputs.values())
            if clash is not None:
                path, src = clash
                src_name = next(k for k, v in inputs.items() if v == src)
                kind = (": not a directory"
                        if name == "out" and path == target and not path.is_dir() else "")
                raise OutputError(
                    f"refusing to write {path} (--{name.replace('_', '-')}{kind}): it "
                    f"is the {src_name} input {src}; choose another output path. "
                    "Nothing was done.")

    def invoke(self, ctx: click.Context) -> Any:
        before = len(WRITTEN)
        try:
            return super().invoke(ctx)
        except AuditError as exc:
            raise fail(str(exc), exc.exit_code) from None
        except KeyboardInterrupt:
            written = WRITTEN[before:]
            what = ("nothing was written" if not written else
                    f"only {', '.join(written)} had been written")
            click.echo(f"\ninterrupted: {what}", err=True)
            ctx.exit(130)


def _quiet_unless_main(dctx: distributed.Context) -> None:
    """A rank other than 0 prints nothing from here on: its stdout and stderr go to os.devnull
    for the rest of the process (the error message of a failed command, printed after this
    block, included: rank 0 prints the same); the traceback of an unexpected error still
    reaches its real stderr."""
    if not dctx.is_main:
        rank = dctx.rank

        def hook(kind: Any, value: Any, tb: Any) -> None:
            sys.__stderr__.write(f"[model-audit rank {rank}] ")
            traceback.print_exception(kind, value, tb, file=sys.__stderr__)

        sys.stdout = sys.stderr = open(os.devnull, "w")  # noqa: SIM115 - for the process
        sys.excepthook = hook


def model_options(func: Callable[..., Any]) -> Callable[..., Any]:
    """The options that choose the model and the probe, the same in every command."""
    options = [
        click.option("--probe", type=click.Path(path_type=Path), default=None,
                     help="Probe set: an ImageFolder directory; a .safetensors file with "
                          "labels and images (N,C,H,W) or inputs (N,...: any other data); a "
                          "CSV or Parquet manifest of path,label rows; a Hugging Face "
                          "save_to_disk directory; or torchvision:NAME:ROOT[:split]."),
        *(click.option(f"--{what}-column", default=None,
                       help=f"The {what} column of a manifest or datasets directory "
                            "(default: detected).") for what in ("image", "label")),
        click.option("--arch", default=None,
                     help="Architecture: a torchvision name (resnet18), a CIFAR-stem ResNet "
                          "(resnet18-cifar), timm:NAME or package.module:factory. Default: "
                          "the checkpoint's metadata or model directory, else the one "
                          "architecture its keys and shapes match."),
        click.option("--num-classes", type=int, default=None,
                     help="Outputs of the head. Default: metadata, else the head's weight."),
        click.option("--normalize", default=None,
                     help="cifar10 | imagenet | none | MEAN,STD. Default: the checkpoint's "
                          "metadata, else its timm or image-processor config, else none."),
        click.option("--resize", default=None,
                     help="Resize images to N or HxW (default: the input size of its timm or "
                          "image-processor config, else keep)."),
        click.option("--limit", type=int, default=None,
                     help="Use a class-stratified random subset of N probe images (seeded)."),
        click.option("--seed", type=int, default=0, show_default=True,
                     help="Seed of the subset, the bootstrap and everything random."),
        click.option("--device", default="auto", show_default=True,
                     help=f"{' | '.join(DEVICES)} (auto: cuda when available)."),
        click.option("--granularity", type=click.Choice(GRANULARITIES), default="group",
                     show_default=True, help="Layer groups: top-level groups, blocks or modules."),
        click.option("--batch-size", type=int, default=128, show_default=True,
                     help="Images per forward/backward pass (bounds memory)."),
        click.option("--workers", type=int, default=None,
                     help="DataLoader processes decoding probe images ahead of the model "
                          "(default: up to 4 for an image folder, 0 for a tensor file)."),
        click.option("--quiet", "-q", is_flag=True, default=False,
                     help="No progress bars and no warnings; only the result."),
    ]
    for option in reversed(options):
        func = option(func)
    return func


def audit_options(kw: dict) -> AuditOptions:
    return AuditOptions(arch=kw["arch"], num_classes=kw["num_classes"],
                        normalize=kw["normalize"], resize=kw["resize"], limit=kw["limit"],
                        seed=kw["seed"], device=kw["device"], granularity=kw["granularity"],
                        batch_size=kw["batch_size"], workers=kw["workers"],
                        image_column=kw["image_column"], label_column=kw["label_column"])


def need_probe(probe: Optional[Path]) -> Path:
    if probe is None:
        raise click.UsageError(
            "no probe set given: pass --probe PATH (an ImageFolder directory or a .safetensors "
            "file with images and labels), or set probe = \"PATH\" under [tool.model-audit] in "
            "./pyproject.toml (or in ./model-audit.toml)")
    return probe


def show_progress(quiet: bool) -> bool:
    return not quiet and sys.stderr.isatty()
