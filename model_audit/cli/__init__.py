"""The ``model-audit`` command line: thin commands over the library API.

Each command parses its options, makes one library call and prints. Every
:class:`~model_audit.errors.AuditError` becomes a one-paragraph message on stderr and exit 2.

Most of this module is the commands' click option declarations and their help texts, which
belong next to the commands; the command bodies stay a few lines each. What the commands share
(the group, the model options) is in :mod:`.group`; the files they write and the text they
print come from :mod:`model_audit.outputs`.
"""
from __future__ import annotations

from functools import partial
from pathlib import Path
from typing import Any, Optional, Tuple

import click

from .. import distributed
from .._version import __version__
from ..baselines import resolve_baselines
from ..commands.compare import compare as run_compare
from ..commands.fix import NO_REPAIR_EXIT
from ..commands.fix import fix as run_fix
from ..commands.gate import check_gate
from ..commands.sanity import read_evidence, scan_with_best_method
from ..commands.scan import scan as run_scan
from ..config import load_defaults
from ..core.plant import resolve_defects
from ..core.replay import ReplayConfig
from ..core.schedules import SCHEDULES
from ..errors import AuditError, OutputError
from ..io.files import atomic_write_bytes
from ..io.records import AuditRecord
from ..models import timm_models
from ..models.registry import available_architectures
from ..outputs import (format_compare, format_fix, format_gate, format_sanity, format_scan,
                      run_sanity_cli, write_compare, write_fix, write_gate, write_sanity,
                      write_scan)
from ..policy import EXAMPLE_POLICY, load_policy
from ..render.html import render_directory
from ..results.compare import CompareConfig
from ..results.fix import BATCHNORM_MODES, HEAD_ROWS, FixConfig
from ..results.sanity import SanityConfig
from ..results.scan import METRICS, ScanConfig
from .group import (COMMANDS_WITH_MODEL, AuditGroup, audit_options, fail, model_options, need_probe,
                    show_progress)


@click.group(cls=AuditGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="model-audit")
@click.pass_context
def cli(ctx: click.Context) -> None:
    """Audit a trained PyTorch classifier: which layer groups are responsible for its errors.

    Defaults for any option can be set in ./pyproject.toml under [tool.model-audit] (or in
    ./model-audit.toml); options on the command line override them.
    """
    try:
        defaults = load_defaults()
    except AuditError as exc:
        raise fail(str(exc), exc.exit_code) from None
    if defaults:
        ctx.default_map = {name: defaults for name in COMMANDS_WITH_MODEL}


@cli.command()
@click.argument("checkpoint", type=click.Path(path_type=Path))
@model_options
@click.option("--out", type=click.Path(path_type=Path), default=None,
              help="Output directory for audit.json and report.html [default: "
                   "reports/<checkpoint name>].")
@click.option("--bootstrap", type=int, default=200, show_default=True,
              help="Bootstrap resamples of the probe for the flag frequency (0: off).")
@click.option("--replay-steps", type=int, default=ReplayConfig.steps, show_default=True,
              help="Beta-scheduled replay steps over the misclassified images.")
@click.option("--replay-lr", type=float, default=ReplayConfig.lr, show_default=True,
              help="Peak learning rate of the replay (cosine down to a tenth).")
@click.option("--replay-schedule", type=click.Choice(SCHEDULES), default=ReplayConfig.schedule,
              show_default=True, help="Momentum schedule of the replay.")
@click.option("--baselines", default="default", show_default=True,
              help="Attribution baselines beside the own metric: default (the cheap ones: "
                   "grad_x_activation, auto_rgn), all, none, or names separated by commas "
                   "(activation, conductance, integrated_gradients, internal_influence, ...).")
@click.option("--baseline-steps", type=int, default=50, show_default=True,
              help="n_steps of the path baselines (conductance, integrated gradients, "
                   "internal influence).")
@click.option("--metric", type=click.Choice(list(METRICS)), default=ScanConfig.metric,
              show_default=True,
              help="The own metric: alone_net (loss each group alone removes from the "
                   "errors in 3 gradient steps, net of what it adds to correct images), "
                   "replay_reduction (loss removed from the errors by each group's part of the "
                   "beta-scheduled replay) or net_reduction (the replay's step, errors and "
                   "correct images, scaled at its best); see docs/method.md.")
@click.option("--method", default=ScanConfig.method, show_default=True,
              help="What ranks and flags the groups: combined (the own metric with Auto-RGN: "
                   "the geometric mean of their shares), own (the metric alone), a baseline's "
                   "name (e.g. auto_rgn), or auto: the method that localised faults "
                   "best on this model, from --sanity, else from a sanity run first (costly: "
                   "the cost is said up front).")
@click.option("--sanity", "sanity_json", type=click.Path(path_type=Path), default=None,
              help="The sanity.json of this checkpoint and probe: the scan says how far its "
                   "ranking is to be trusted on this model (and --method auto picks from it).")
def scan(checkpoint: Path, out: Optional[Path], bootstrap: int, replay_steps: int,
         replay_lr: float, replay_schedule: str, baselines: str, baseline_steps: int,
         metric: str, method: str, sanity_json: Optional[Path], **kw: Any) -> None:
    """Scan CHECKPOINT: attribute its errors on the probe set to layer groups.

    Prints a table (group, parameter share, score, flag frequency, flagged) and writes
    OUT/audit.json and OUT/report.html (and OUT/sanity/ when --method auto ran sanity).
    """
    probe = need_probe(kw["probe"])
    config = ScanConfig(options=audit_options(kw),
                        replay=ReplayConfig(steps=replay_steps, lr=replay_lr,
                                            schedule=replay_schedule),
                        bootstrap=bootstrap, baselines=resolve_baselines(baselines),
                        baseline_steps=baseline_steps, metric=metric, method=method.strip(),
                        evidence=read_evidence(sanity_json) if sanity_json else None)
    out = out if out is not None else Path("reports") / checkpoint.stem
    ran_sanity = None
    if config.method == "auto" and config.evidence is None:
        say = None if kw["quiet"] else (lambda m: click.echo(m, err=True))
        result, ran_sanity = scan_with_best_method(
            checkpoint, probe, config, progress=show_progress(kw["quiet"]),
            run_sanity=partial(run_sanity_cli, progress=show_progress(kw["quiet"]), say=say),
            source=str(out / "sanity"))
    else:
        config.validate()
        result = run_scan(checkpoint, probe, config, progress=show_progress(kw["quiet"]))
    paths = distributed.on_main(write_scan, result, out)
    if ran_sanity is not None:
        distributed.on_main(write_sanity, ran_sanity, out / "sanity",
                            inputs=(checkpoint, probe))
    if not kw["quiet"]:
        for warning in result.warnings:
            click.echo(f"warning: {warning}", err=True)
    click.echo(format_scan(result, summary=not kw["quiet"]))
    if not kw["quiet"]:
        click.echo(f"wrote {paths['audit']} and {paths['report']} "
                   f"({result.timing['total_s']:.1f} s on {result.device})")


def _scan_or_load(path: Path, kw: dict, progress: bool) -> Any:
    """An ``audit.json`` is read as it is; a checkpoint is scanned with the shared options."""
    if path.suffix.lower() == ".json":
        return AuditRecord.read(path)
    probe = need_probe(kw["probe"])
    return run_scan(path, probe, ScanConfig(options=audit_options(kw)), progress=progress)


@cli.command()
@click.argument("a", type=click.Path(exists=True, path_type=Path))
@click.argument("b", type=click.Path(exists=True, path_type=Path))
@model_options
@click.option("--out", type=click.Path(path_type=Path), default=None,
              help="Output directory for compare.json and report.html "
                   "[default: reports/compare-<A>-vs-<B>].")
@click.option("--allow-partial", is_flag=True, default=False,
              help="Compare only the layer groups both have (different architectures).")
@click.option("--resamples", type=int, default=1000, show_default=True,
              help="Bootstrap resamples over probe samples for the intervals (0: off).")
def compare(a: Path, b: Path, out: Optional[Path], allow_partial: bool, resamples: int,
            **kw: Any) -> None:
    """Compare two checkpoints (or two audit.json files): do they flag the same groups?

    A and B are checkpoints (scanned on the same --probe with the same options) or audit.json
    files written by scan. Prints both flagged sets, overlap against chance, rank correlation
    with bootstrap intervals, and writes OUT/compare.json and OUT/report.html.
    """
    config = CompareConfig(allow_partial=allow_partial, resamples=resamples, seed=kw["seed"])
    config.validate()
    out = out if out is not None else Path("reports") / f"compare-{a.stem}-vs-{b.stem}"
    progress = show_progress(kw["quiet"])
    scans = [_scan_or_load(a, kw, progress), _scan_or_load(b, kw, progress)]
    result = run_compare(scans[0], scans[1], config)
    paths = distributed.on_main(write_compare, result, out, inputs=(a, b))
    click.echo(format_compare(result))
    if not kw["quiet"]:
        click.echo(f"wrote {paths['compare']} and {paths['report']}")


@cli.command()
@click.argument("checkpoint", type=click.Path(path_type=Path), required=False)
@model_options
@click.option("--policy", type=click.Path(path_type=Path), default=None,
              help="Policy file (TOML). With --init: where to write the example.")
@click.option("--baseline", type=click.Path(path_type=Path), default=None,
              help="The previous release's audit.json, for the regression checks.")
@click.option("--out", type=click.Path(path_type=Path), default=None,
              help="Output directory for gate.json, audit.json and report.html "
                   "[default: reports/gate-<checkpoint name>].")
@click.option("--junit", type=click.Path(path_type=Path), default=None,
              help="Also write JUnit XML (one testcase per check) to this file.")
@click.option("--summary", type=click.Path(path_type=Path), default=None,
              help="Also write a Markdown summary (e.g. $GITHUB_STEP_SUMMARY) to this file.")
@click.option("--init", "init", is_flag=True, default=False,
              help="Write a commented example policy to --policy (default "
                   "model-audit-policy.toml) and exit.")
@click.option("--sanity", "sanity_file", type=click.Path(path_type=Path), default=None,
              help="A sanity.json of this checkpoint (`model-audit sanity`), for the policy's "
                   "min_sanity_top1; without it the gate runs the check.")
def gate(checkpoint: Optional[Path], policy: Optional[Path], baseline: Optional[Path],
         out: Optional[Path], junit: Optional[Path], summary: Optional[Path], init: bool,
         sanity_file: Optional[Path], **kw: Any) -> None:
    """Release gate: check CHECKPOINT against a policy; the exit code is the verdict.

    Exit codes: 0 all checks passed; 1 a check failed; 2 bad input or internal error;
    3 nothing was audited (empty probe, checkpoint without tensors).
    """
    if init:
        target = policy or Path("model-audit-policy.toml")
        distributed.on_main(_write_policy, target)
        click.echo(f"wrote {target}")
        return
    if checkpoint is None:
        raise click.UsageError("give CHECKPOINT (or --init to write an example policy)")
    if policy is None:
        raise click.UsageError("give --policy POLICY.toml (`model-audit gate --init` writes one)")
    rules = load_policy(policy)
    probe = need_probe(kw["probe"])
    out = out if out is not None else Path("reports") / f"gate-{checkpoint.stem}"
    try:
        result = check_gate(checkpoint, probe, rules, baseline=baseline,
                            scan_config=ScanConfig(options=audit_options(kw)),
                            progress=show_progress(kw["quiet"]), sanity=sanity_file)
        distributed.on_main(write_gate, result, out, junit=junit, summary=summary,
                            inputs=tuple(p for p in (checkpoint, probe, policy, baseline,
                                                     sanity_file) if p))
    except AuditError:
        raise
    except Exception as exc:  # an internal error must not look like a pass or a failed check
        raise fail(f"internal error: {type(exc).__name__}: {exc}") from exc
    click.echo(format_gate(result).rstrip())
    click.get_current_context().exit(result.exit_code)


def _write_policy(target: Path) -> None:
    if target.exists():
        raise OutputError(f"{target} exists; not overwriting it (give another --policy path)")
    atomic_write_bytes(target, EXAMPLE_POLICY.encode("utf-8"))


def _wrong_fraction(text: str) -> Optional[float]:
    if text.strip().lower() == "natural":
        return None
    try:
        return float(text)
    except ValueError:
        raise fail(f"--wrong-fraction must be a number between 0 and 1 or 'natural', got "
                    f"{text!r}") from None


@cli.command()
@click.argument("checkpoint", type=click.Path(path_type=Path))
@model_options
@click.option("--train", "train", type=click.Path(path_type=Path), required=True,
              help="Repair data: a training split (ImageFolder directory or tensor file).")
@click.option("--output", type=click.Path(path_type=Path), required=True,
              help="Where to write the repaired checkpoint (.safetensors; a new directory when "
                   "CHECKPOINT is a model directory; never an input).")
@click.option("--layers", default="auto", show_default=True,
              help="auto (the groups scan flags) or group names separated by commas.")
@click.option("--audit", type=click.Path(path_type=Path), default=None,
              help="With --layers auto: take the flagged groups from this audit.json of the "
                   "same checkpoint instead of scanning first.")
@click.option("--steps", type=int, default=200, show_default=True, help="Optimizer steps.")
@click.option("--epochs", type=float, default=None,
              help="Passes over the repair data instead of --steps.")
@click.option("--fix-batch-size", type=int, default=64, show_default=True,
              help="Images per repair step.")
@click.option("--wrong-fraction", default="natural", show_default=True,
              help="Share of each repair batch drawn from the images the model gets wrong "
                   "(the rest from those it gets right), or 'natural' to sample the repair "
                   "data uniformly (plain fine-tuning).")
@click.option("--batchnorm", type=click.Choice(BATCHNORM_MODES), default="train",
              show_default=True,
              help="frozen: every BatchNorm keeps its statistics; train: the BatchNorm layers "
                   "of the retrained groups use batch statistics and update them.")
@click.option("--lr", type=float, default=0.01, show_default=True,
              help="Peak learning rate of the repair (cosine to 0).")
@click.option("--schedule", type=click.Choice(SCHEDULES), default="beta", show_default=True,
              help="Momentum schedule of the repair.")
@click.option("--controls", default="all,random,rgn", show_default=True,
              help="Controls with the same budget: all, random, rgn (comma list) or none.")
@click.option("--train-limit", type=int, default=None,
              help="Use a class-stratified random subset of N repair images.")
@click.option("--allow-overlap", is_flag=True, default=False,
              help="Proceed although probe and repair data share images.")
@click.option("--validation", type=float, default=FixConfig.validation, show_default=True,
              help="Share of the repair data held out (stratified) to judge the repair: the "
                   "best state along it is kept only if it beats the original there by more "
                   "than noise. In (0, 0.5].")
@click.option("--preserve", type=float, default=FixConfig.preserve, show_default=True,
              help="Weight of the preservation term: the divergence of the repaired model's "
                   "outputs from the original's on the images it classified correctly (0: off).")
@click.option("--target", "targets", multiple=True,
              help="Repair one confusion: TRUE:PRED (class names or indices; repeatable), or "
                   "auto (the largest confusion of the repair data).")
@click.option("--target-fraction", type=float, default=FixConfig.target_fraction,
              show_default=True,
              help="With --target: share of each repair batch drawn from its instances.")
@click.option("--head-rows", type=click.Choice(HEAD_ROWS), default=FixConfig.head_rows,
              show_default=True,
              help="With --target, when the classifier head is retrained: change only its "
                   "rows of the confusion's predicted class (target: no other class's logit "
                   "moves) or all of them.")
@click.option("--max-break", type=float, default=None,
              help="Break budget: keep only a state that breaks at most this share of the "
                   "validation images the model gets right (e.g. 0.005) [default: no budget, "
                   "the best net].")
@click.option("--write-anyway", is_flag=True, default=False,
              help="Write the best trained state even when no repair beat the original on "
                   "validation (exit 0 instead of 3).")
@click.option("--out", type=click.Path(path_type=Path), default=None,
              help="Directory for fix.json and report.html [default: reports/fix-<name>].")
def fix(checkpoint: Path, train: Path, output: Path, layers: str, audit: Optional[Path],
        steps: int, epochs: Optional[float], fix_batch_size: int, wrong_fraction: str,
        batchnorm: str, lr: float, schedule: str,
        controls: str, train_limit: Optional[int], allow_overlap: bool, validation: float,
        preserve: float, targets: Tuple[str, ...], target_fraction: float, head_rows: str,
        max_break: Optional[float], write_anyway: bool, out: Optional[Path], **kw: Any) -> None:
    """Retrain only the flagged layer groups of CHECKPOINT; write it only if it is better.

    Trains the selected groups on --train minus a held-out --validation share (everything
    else frozen, BatchNorm statistics outside the selection included) and keeps the state
    that beats the original on that share, if one does. Evaluates before and after on the
    held-out --probe, runs the controls with the same budget and validation, writes the
    repaired checkpoint to --output (verified: frozen tensors byte-identical) and
    OUT/fix.json and OUT/report.html. Exit 3: no repair beat the original, nothing written
    but fix.json and report.html.
    """
    probe = need_probe(kw["probe"])
    names = [c.strip() for c in controls.split(",") if c.strip()]
    config = FixConfig(
        options=audit_options(kw),
        layers="auto" if layers.strip() == "auto" else tuple(
            n.strip() for n in layers.split(",") if n.strip()),
        steps=steps, epochs=epochs, batch_size=fix_batch_size,
        wrong_fraction=_wrong_fraction(wrong_fraction), batchnorm=batchnorm, lr=lr,
        schedule=schedule,
        controls=() if names == ["none"] else tuple(names), allow_overlap=allow_overlap,
        train_limit=train_limit, validation=validation, preserve=preserve,
        target=tuple(targets), target_fraction=target_fraction, head_rows=head_rows,
        max_break=max_break,
        write_anyway=write_anyway)
    config.validate()
    out = out if out is not None else Path("reports") / f"fix-{checkpoint.stem}"
    result = run_fix(checkpoint, train, probe, output, config, audit=audit,
                     progress=show_progress(kw["quiet"]))
    paths = distributed.on_main(write_fix, result, out)
    if not kw["quiet"]:
        for warning in result.warnings:
            click.echo(f"warning: {warning}", err=True)
    click.echo(format_fix(result))
    if not kw["quiet"]:
        written = f"{output}, " if result.written else ""
        click.echo(f"wrote {written}{paths['fix']} and {paths['report']}")
    if not result.written:  # no repair beat the original: documented exit code, no traceback
        click.get_current_context().exit(NO_REPAIR_EXIT)


def _sanity_methods(text: str) -> Tuple[str, ...]:
    """``--methods``: ``own`` (always included) and baseline names or keywords."""
    items = [t.strip() for t in text.split(",") if t.strip()]
    try:
        return resolve_baselines([t for t in items if t.lower() != "own"])
    except AuditError as exc:
        raise fail(f"{exc} (and own, the tool's metric, always included)") from None


@cli.command()
@click.argument("checkpoint", type=click.Path(path_type=Path))
@model_options
@click.option("--defects", default="noise,reinit", show_default=True,
              help="Defects to plant: all, or noise, reinit, labelswap, bnstats separated by "
                   "commas.")
@click.option("--drop", type=float, default=0.10, show_default=True,
              help="Accuracy drop every planted defect is calibrated to cost (0..1).")
@click.option("--tolerance", type=float, default=0.01, show_default=True,
              help="Accepted distance of the drop from the target.")
@click.option("--groups", "groups", default="auto", show_default=True,
              help="Groups to plant in: auto (every group, or an even spread of 8 in a model "
                   "with more) or names separated by commas.")
@click.option("--methods", default="own,default", show_default=True,
              help="Methods to score: own (the tool's metric, always included) and baselines "
                   "(default, all, or names such as auto_rgn, grad_x_activation).")
@click.option("--metric", type=click.Choice(list(METRICS)), default=ScanConfig.metric,
              show_default=True, help="The own metric's formulation (as in scan).")
@click.option("--repeats", type=int, default=1, show_default=True,
              help="Seeds per group and defect (the spread of the hit rates).")
@click.option("--out", type=click.Path(path_type=Path), default=None,
              help="Output directory for sanity.json and report.html "
                   "[default: reports/sanity-<checkpoint name>].")
@click.option("--keep-damaged", "keep_damaged", type=click.Path(path_type=Path), default=None,
              help="Also save every damaged copy here (.safetensors); by default they exist "
                   "only in memory.")
def sanity(checkpoint: Path, defects: str, drop: float, tolerance: float, groups: str,
           methods: str, metric: str, repeats: int, out: Optional[Path],
           keep_damaged: Optional[Path], **kw: Any) -> None:
    """Plant a known fault in each layer group of CHECKPOINT: does the scan find it?

    For each group and defect: damage a copy of the model in that group only, calibrated to
    cost --drop accuracy on the probe; scan the copy; record the planted group's rank under
    each method. Prints per method top-1 and MRR beside chance, and writes OUT/sanity.json and
    OUT/report.html. The checkpoint is never written.
    """
    probe = need_probe(kw["probe"])

    config = SanityConfig(
        defects=resolve_defects(defects), drop=drop, tolerance=tolerance, repeats=repeats,
        groups=None if groups.strip().lower() == "auto"
        else tuple(g.strip() for g in groups.split(",") if g.strip()),
        scan=ScanConfig(options=audit_options(kw), baselines=_sanity_methods(methods),
                        metric=metric))
    out = out if out is not None else Path("reports") / f"sanity-{checkpoint.stem}"
    result = run_sanity_cli(checkpoint, probe, config, keep_damaged=keep_damaged,
                            progress=show_progress(kw["quiet"]),
                            say=None if kw["quiet"] else (lambda m: click.echo(m, err=True)))
    paths = distributed.on_main(write_sanity, result, out, inputs=(checkpoint, probe))
    data = result.to_dict()
    click.echo(format_sanity(data))
    if not kw["quiet"]:
        click.echo(f"wrote {paths['sanity']} and {paths['report']} ({result.seconds:.1f} s)")


@cli.command()
@click.argument("directory", type=click.Path(path_type=Path))
def report(directory: Path) -> None:
    """Re-render DIRECTORY/report.html from the JSON files a command wrote there."""
    click.echo(f"wrote {distributed.on_main(render_directory, directory)}")


@cli.command()
def archs() -> None:
    """List the registered architecture names (and how to name a timm model or your own)."""
    for name in available_architectures():
        click.echo(name)
    timm_note = ("timm:NAME for any of timm's models (python -c \"import timm; "
                 "print(timm.list_models())\")" if timm_models.installed() else
                 "timm:NAME once timm is installed (pip install 'model-audit[timm]')")
    click.echo(f"# also: {timm_note}; a Hugging Face save_pretrained directory as the "
               "checkpoint; package.module:factory for your own model", err=True)


def main() -> None:
    cli(prog_name="model-audit")
