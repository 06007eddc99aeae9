"""The `srkit` command line: parses options and calls srkit.api / srkit.registry; no model logic lives here.

Importing PyTorch takes seconds, so this module does not: every option of `srkit upscale` is checked and its batch
planned (srkit.request) before a command imports srkit.api, and a typo is refused in a fraction of a second.
"""

from __future__ import annotations

if __name__ == "__main__":  # `python -m srkit.cli` (torchrun): Ctrl-C during the imports below exits quietly
    from srkit.__main__ import exit_quietly_on_interrupt

    exit_quietly_on_interrupt()

import inspect
import json
import signal
import sys
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table

from srkit import __version__, registry
from srkit.batch import BatchPlan, UpscaleSettings
from srkit.common import check_choice, field_docs, one_line
from srkit.degrade.cli import degrade
from srkit.distributed import exit_launched_process, launched_ranks
from srkit.engines.catalogue import DEFAULT_MODEL, describe, model_names, user_models
from srkit.option_values import TAG_MODELS
from srkit.report import BatchInterrupted, BatchReport, FileResult
from srkit.request import DEFAULT_OVERLAP, prepare_upscale
from srkit.train.recipes import RECIPES, built_recipes, check_recipe, describe_settings, describe_training

err = Console(stderr=True, soft_wrap=True)  # one message = one line, whatever the width
out = Console(width=None if sys.stdout.isatty() else 200)  # pipes and files get whole lines
PARSER_ERROR = next(cls for cls in typer.BadParameter.__mro__ if cls.__name__ == "ClickException")
"""The base of the option parser's own errors (an unknown option, a value of the wrong type, a missing value)."""


class _Commands(typer.core.TyperGroup):
    """srkit's command group: the parser's own errors are one line, `error: ...`, like srkit's checks (Typer would
    frame them in a box under the usage), with the parser's exit code (2)."""

    def main(self, args: Any = None, prog_name: Any = None, complete_var: Any = None, standalone_mode: bool = True,
             **extra: Any) -> Any:  # fmt: skip
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, standalone_mode, **extra)
        try:
            code = super().main(args, prog_name, complete_var, False, **extra)
        except typer.Abort:
            err.print("aborted", highlight=False)
            sys.exit(1)
        except PARSER_ERROR as exc:
            message = exc.format_message().strip()
            if "\n" in message:  # `no_args_is_help`: the message is the help text itself
                exc.show()
            elif message:  # (empty: the help was shown already)
                where = f" (see `{self._command_path(exc, args)} --help`)"
                err.print(f"[bold red]error:[/] {escape(message)}{escape(where)}", highlight=False)
            sys.exit(exc.exit_code)
        code = code if isinstance(code, int) else 0
        if launched_ranks().world > 1:
            exit_launched_process(code)
        sys.exit(code)

    def _command_path(self, exc: Exception, args: Any) -> str:
        """The command whose options failed to parse ("srkit upscale"): the error's context where it has one (a
        missing option value has none; then the first word of the command line that names a command)."""
        context = getattr(exc, "ctx", None)
        if context is not None:
            return context.command_path
        words = list(sys.argv[1:] if args is None else args)
        command = next((word for word in words if word in self.commands), None)
        return "srkit" if command is None else f"srkit {command}"

    def invoke(self, ctx: Any) -> Any:
        """From here on Ctrl-C is Python's KeyboardInterrupt, which a batch turns into its report (until here,
        srkit.__main__'s handler ends the process with "interrupted").  Ctrl-C while a command's options are parsed,
        or in a command with no report of its own: "interrupted", exit code 130 (Typer would exit silently)."""
        signal.signal(signal.SIGINT, signal.default_int_handler)
        try:
            return super().invoke(ctx)
        except KeyboardInterrupt:
            err.print("interrupted", highlight=False)
            raise typer.Exit(130) from None


app = typer.Typer(cls=_Commands, add_completion=False, no_args_is_help=True,
                  help="Super-resolution: GAN and one-step diffusion models.")  # fmt: skip
weights_app = typer.Typer(no_args_is_help=True, help="List, fetch, verify, import and add model weights.")
app.add_typer(weights_app, name="weights")


MODELS_WIDTH = 80
"""`srkit models` fits a standard terminal; `srkit models NAME` has the details."""


class CliError(Exception):
    """An expected failure: printed as one line, exit code 2."""


def _fail(message: str, code: int = 2) -> None:
    err.print(f"[bold red]error:[/] {escape(message)}", highlight=False, markup=True, soft_wrap=True)
    raise typer.Exit(code)


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """A library's warning as one srkit line, without the file, line and source it was raised from."""
    err.print(f"warning: {one_line(Warning(str(message)))}", highlight=False, markup=False)


def _version(value: bool) -> None:
    if value:
        print(f"srkit {__version__}")
        raise typer.Exit()


@app.callback()
def _options(
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")] = False,
) -> None:
    """Super-resolution: GAN and one-step diffusion models."""
    warnings.showwarning = _show_warning


def _engine_options(pairs: list[str], flags: list[str] = ()) -> dict[str, Any]:
    """Engine options from `-O key=value` pairs and `--name value` flags (the names of the chosen engine's
    typed options; the engine checks them)."""
    options: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep:
            raise CliError(f"--option expects key=value, got '{pair}'")
        options[key.strip().replace("-", "_")] = value
    for index in range(0, len(flags), 2):
        name = flags[index]
        if index + 1 >= len(flags):
            raise CliError(f"{name} expects a value (e.g. {name} true for a switch)")
        options[name[2:].replace("-", "_")] = flags[index + 1]
    return options


def split_engine_flags(tokens: list[str]) -> tuple[list[str], list[str]]:
    """Input paths and `--name value` pairs from what follows `srkit upscale`.

    Options the command does not know itself (`--blur 0.3`, `--steps 20`, `--tagger dape`) arrive among the
    inputs; each is an engine option name followed by its value (a value never starts with "--").
    """
    inputs: list[str] = []
    flags: list[str] = []
    expect_value = False
    for token in tokens:
        if expect_value:
            if token.startswith("--"):
                raise CliError(f"{flags[-1]} expects a value (e.g. {flags[-1]} true for a switch)")
            flags.append(token)
            expect_value = False
        elif token.startswith("--") and len(token) > 2:
            name, sep, value = token.partition("=")
            flags.append(name)
            if sep:
                flags.append(value)
            else:
                expect_value = True
        else:
            inputs.append(token)
    if expect_value:
        raise CliError(f"{flags[-1]} expects a value (e.g. {flags[-1]} true for a switch)")
    return inputs, flags


ENGINE_OPTIONS_HELP = (
    "Image files, folders or glob patterns. Model options follow as --name value, e.g. --color-fix adain, "
    "--guidance 1.2, --prompt TEXT, --blur 0.3 (s3diff), --denoise-strength 0.3 "
    "(realesr-general-x4v3); `srkit models NAME` lists a model's options."
)


@app.command(context_settings={"ignore_unknown_options": True})
def upscale(
    inputs: Annotated[list[str], typer.Argument(help=ENGINE_OPTIONS_HELP)],
    output: Annotated[Path | None, typer.Option("-o", "--output", help="Output file (one input) or folder.")] = None,
    model: Annotated[str, typer.Option("-m", "--model", help="Model name; see `srkit models`.")] = DEFAULT_MODEL,
    scale: Annotated[float | None, typer.Option("-s", "--scale", help="Output scale (default: the model's).")] = None,
    resize_filter: Annotated[str, typer.Option("--resize-filter", help="Filter for the final resize to --scale.")] = "lanczos",
    tile: Annotated[str, typer.Option("--tile", help="Pixel tile size: auto, a number, or 0 for none.")] = "auto",
    tile_overlap: Annotated[int, typer.Option("--tile-overlap", help="Tile overlap in input pixels.")] = DEFAULT_OVERLAP,
    device: Annotated[str, typer.Option("--device", help="auto, cpu, cuda, cuda:N.")] = "auto",
    dtype: Annotated[str, typer.Option("--dtype", help="auto (bf16/fp16 on CUDA; on the CPU what `srkit info` shows), fp32 (every part), fp16, bf16.")] = "auto",
    weights: Annotated[Path | None, typer.Option("--weights", help="Use this checkpoint instead of the registry's.")] = None,
    suffix: Annotated[str | None, typer.Option("--suffix", help="Appended to output names (default: '' in -o, else _x{scale}).")] = None,
    ext: Annotated[str, typer.Option("--ext", help="Output format: auto (as input), png, jpg, webp, tif.")] = "auto",
    recursive: Annotated[bool, typer.Option("-r", "--recursive", help="Descend into sub-folders.")] = False,
    skip_existing: Annotated[bool, typer.Option("--skip-existing", help="Skip inputs whose output exists.")] = False,
    alpha: Annotated[str, typer.Option("--alpha", help="Alpha: model (premultiplied, upscaled by the model), resize, drop.")] = "model",
    samples: Annotated[int, typer.Option("--samples", help="Stochastic models: write N outputs per input, {stem}_s{seed}.")] = 1,
    seed: Annotated[int, typer.Option("--seed", help="Seed for every random draw.")] = 0,
    quality: Annotated[int, typer.Option("--quality", help="JPEG/WebP quality.")] = 95,
    offline: Annotated[bool, typer.Option("--offline", help="Never touch the network (also SRKIT_OFFLINE=1).")] = False,
    option: Annotated[list[str], typer.Option("-O", "--option", help="Any model option as key=value (see `srkit models NAME`).")] = [],  # noqa: B006
    as_json: Annotated[bool, typer.Option("--json", help="Print a machine-readable summary on stdout.")] = False,
    quiet: Annotated[bool, typer.Option("-q", "--quiet", help="No progress bars or messages.")] = False,
) -> None:
    """Upscale images with a model (default: Real-ESRGAN x4plus, embedded, works offline)."""
    ranks = launched_ranks()
    log = (lambda message: None) if quiet or not ranks.is_main else (
        lambda message: err.print(message, highlight=False, markup=False))  # fmt: skip
    stop = (lambda message, code: _json_stop(BatchReport(model, error=message), code)) if as_json else _fail
    show_progress = not (quiet or as_json) and ranks.is_main and err.is_terminal
    try:
        paths, flags = split_engine_flags(inputs)
        settings = UpscaleSettings(
            output=output.expanduser() if output else None, scale=scale, suffix=suffix, ext=ext,
            recursive=recursive, skip_existing=skip_existing, alpha=alpha, resize_filter=resize_filter,
            samples=samples, seed=seed, quality=quality,
        )  # fmt: skip
        request = prepare_upscale(paths, settings, model=model, warn=log, dtype=dtype, tile=tile,
                                  tile_overlap=tile_overlap, **_engine_options(option, flags))  # fmt: skip
        from srkit import api, distributed  # PyTorch loads here, once every option has been checked

        with distributed.process_group(), _offline_env(offline), _file_progress(show_progress) as bar:
            hooks = api.BatchHooks(on_plan=bar.plan, on_start=bar.start, on_file=bar.done, progress=bar.stage, warn=log)
            report = api.run_upscale(request, hooks, device=device, weights=weights)
    except BatchInterrupted as exc:
        _interrupted(exc.report, as_json)
    except KeyboardInterrupt:
        _interrupted(BatchReport(model, error="interrupted"), as_json)
    except (CliError, ValueError, KeyError, registry.WeightsError) as exc:
        stop(one_line(exc), 2)
    if not ranks.is_main:
        raise typer.Exit(0 if report.ok and report.results else 1)
    if not report.results:
        report.error = "no input images found"
        _json_stop(report, 1) if as_json else _fail(report.error, code=1)
    if as_json:
        print(json.dumps(report.to_json(), indent=2))
    elif not quiet:
        counts = report.counts()
        err.print(f"{counts['ok']} written, {counts['skipped']} skipped, {counts['failed']} failed", highlight=False)
    if not report.ok:
        raise typer.Exit(1)


def _json_stop(report: BatchReport, code: int) -> None:
    """`--json` answers every run with one JSON object on stdout, a fatal one included (its `error` says why)."""
    print(json.dumps(report.to_json(), indent=2))
    raise typer.Exit(code)


def _interrupted(report: BatchReport, as_json: bool) -> None:
    """Ctrl-C: what was written and what was not, exit code 130 (outputs are atomic: nothing is half-written)."""
    if as_json:
        _json_stop(report, 130)
    written = [r for r in report.results if r.status == "ok"]
    pending = [r for r in report.results if r.status == "not run"]

    def names(results: list[FileResult]) -> str:
        shown = ", ".join(Path(r.input).name for r in results[:10])
        return shown + (f" and {len(results) - 10} more" if len(results) > 10 else "")

    if not report.results:
        err.print("interrupted before any file was written", highlight=False)
    else:
        err.print(f"interrupted: {len(written)} file(s) written ({names(written) or 'none'}); {len(pending)} not "
                  f"written ({names(pending) or 'none'})", highlight=False, markup=False)  # fmt: skip
    raise typer.Exit(130)


@contextmanager
def _file_progress(enabled: bool) -> Iterator[_FileProgress]:
    bar = _FileProgress(enabled)
    with bar.progress:
        yield bar


class _FileProgress:
    """A batch's progress on stderr: the current file's name, files done of the total planned (known before the
    model loads), elapsed time and ETA; below it, bars for the pixel tiles, latent tiles and sampler steps of the
    current image.  Failures are printed as they happen."""

    def __init__(self, enabled: bool) -> None:
        self.progress = Progress(
            TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
            TextColumn("eta"), TimeRemainingColumn(), console=err, disable=not enabled, transient=True,
        )  # fmt: skip
        self.files = self.progress.add_task("planning", total=None)
        self.stages: dict[str, Any] = {}

    def plan(self, plan: BatchPlan) -> None:
        self.progress.update(self.files, description="loading the model", total=len(plan.to_run()), completed=0)

    def start(self, name: str, done: int, total: int) -> None:
        self.progress.update(self.files, description=Path(name).name, completed=done, total=total)

    def done(self, result: FileResult, done: int, total: int) -> None:
        self.progress.update(self.files, completed=done, total=total)
        for task in self.stages.values():
            self.progress.update(task, visible=False)
        if result.status == "failed":
            self.progress.console.print(f"[red]failed[/] {escape(result.input)}: {escape(result.error or '')}",
                                        highlight=False)  # fmt: skip

    def stage(self, what: str, done: int, total: int) -> None:
        if what not in self.stages:
            self.stages[what] = self.progress.add_task(what, total=total, visible=False)
        self.progress.update(self.stages[what], completed=done, total=total, visible=total > 1)


class _offline_env:
    """`--offline` sets SRKIT_OFFLINE for the duration of the command."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled

    def __enter__(self) -> None:
        import os

        self.previous = os.environ.get("SRKIT_OFFLINE")
        if self.enabled:
            os.environ["SRKIT_OFFLINE"] = "1"

    def __exit__(self, *exc: object) -> None:
        import os

        if self.enabled:
            if self.previous is None:
                os.environ.pop("SRKIT_OFFLINE", None)
            else:
                os.environ["SRKIT_OFFLINE"] = self.previous


# ---------------------------------------------------------------------------------------------------------------


@weights_app.callback()
def _check_registry() -> None:
    """Every weights command reads the layered registry: a malformed file stops it here, in one line."""
    try:
        registry.load_registry()
    except registry.WeightsError as exc:
        _fail(one_line(exc))


def weights_status(name: str) -> str:
    try:
        entry = registry.load_registry().entry(name)
    except registry.WeightsError:
        return "unregistered"
    if entry.location is not None:
        return "local" if registry.is_cached(entry) else "missing"
    if registry.is_cached(entry):
        return "cached"
    if entry.status in ("unreleased", "manual"):
        return entry.status
    if all(any(s.kind == "pypi" for s in f.sources) for f in entry.files):
        return "embedded"
    return "not cached"


def model_status(entries: tuple[str, ...]) -> str:
    """One word for all the weights a model needs: cached, local (a user entry's folder), embedded (built offline
    from a wheel), partial, not cached, missing (a user folder lacks files), manual (to download by hand) or
    unreleased."""
    statuses = {weights_status(name) for name in entries}
    for blocking in ("unreleased", "manual", "missing"):
        if blocking in statuses:
            return blocking
    ready = {"cached", "local", "embedded"}
    if statuses <= ready:
        return next(word for word in ("embedded", "local", "cached") if word in statuses)
    return "partial" if statuses & ready else "not cached"


def _table(*columns: str) -> Table:
    """Names never wrap or get cut (scripts grep them); only the last column folds."""
    table = Table()
    for index, column in enumerate(columns):
        last = index == len(columns) - 1
        table.add_column(column, no_wrap=not last, overflow="fold" if last else "ellipsis")
    return table


@app.command()
def models(name: Annotated[str | None, typer.Argument(help="Show one model's options.")] = None) -> None:
    """List the models: native scale, steps, weights status and licence."""
    import dataclasses

    if name is not None:  # read from the catalogue: no engine module (and no PyTorch) is imported
        try:
            _, model = describe(name)
        except (KeyError, registry.WeightsError) as exc:
            _fail(one_line(exc))
        spec, options_class = model.spec, model.options
        out.print(f"[bold]{spec.name}[/]: {spec.description}\nx{spec.scale}, {spec.steps} step(s), licence {spec.licence}")
        out.print("weights: " + ", ".join(f"{w} ({weights_status(w)})" for w in spec.weights))
        for key in spec.weights:
            if weights_status(key) in ("unreleased", "manual"):
                out.print(f"{key}: {registry.load_registry().entry(key).obtain}", highlight=False)
        table = _table("option", "type", "default", "meaning")
        docs = field_docs(options_class)
        for fld in dataclasses.fields(options_class):
            default = fld.default if fld.default is not dataclasses.MISSING else "(required)"
            table.add_row(f"--{fld.name.replace('_', '-')}", str(fld.type), repr(default), docs.get(fld.name, ""))
        out.print(table)
        return
    try:
        names = model_names() + user_models()  # yours (`srkit weights add`) after the built-in ones
    except registry.WeightsError as exc:
        _fail(one_line(exc))
    rows = []
    for model_name in names:
        spec = describe(model_name)[1].spec
        rows.append((spec.name, f"x{spec.scale}", str(spec.steps), model_status(spec.weights), spec.description))
    headers = ("model", "scale", "steps", "weights", "description")
    widths = [max(len(row[index]) for row in [headers, *rows]) for index in range(len(headers) - 1)]
    console = Console(width=out.width if sys.stdout.isatty() else MODELS_WIDTH)
    room = max(12, console.width - sum(widths) - 2 * (len(headers) - 1))  # the description's share of one line
    table = Table(box=None, pad_edge=False, header_style="bold underline")
    for header, width in zip(headers, [*widths, room], strict=True):
        table.add_column(header, no_wrap=True, min_width=width, max_width=width)
    for *fixed, description in rows:
        table.add_row(*fixed, description if len(description) <= room else description[: room - 1] + "…")
    console.print(table)
    out.print("`srkit models NAME`: a model's licence, weights and options", highlight=False)


@app.command()
def info(
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
) -> None:
    """This machine's CPU features and, per model and network part, the precision and kernels it runs with."""
    from srkit import api
    from srkit.cpu_features import cpu_auto_dtype, detect, dtype_name

    cpu = detect()
    plans: dict[str, dict[str, dict[str, str]]] = {}
    for model_name in model_names():
        try:
            plan = {dtype: api.precision_plan(model_name, "cpu", dtype) for dtype in ("auto", "fp32")}
        except ImportError as exc:  # an optional dependency of that engine is missing
            plans[model_name] = {"unavailable": {"error": one_line(exc)}}
            continue
        plans[model_name] = {part: {d: k.describe() for d, k in (("auto", plan["auto"][part]), ("fp32", plan["fp32"][part]))}
                             for part in plan["auto"]}  # fmt: skip
    cuda = torch_cuda_summary()
    if as_json:
        print(json.dumps({"cpu": cpu.summary(), "cpu_auto_dtype": dtype_name(cpu_auto_dtype(cpu)), "cuda": cuda,
                          "models": plans}, indent=2))  # fmt: skip
        return
    summary = cpu.summary()
    out.print(f"CPU: {summary['name']} ({summary['machine']}, {summary['threads']} threads)", highlight=False)
    out.print(
        f"  kind {summary['kind']}; PyTorch kernels {summary['pytorch_capability']}; native bf16 "
        f"{'yes' if summary['native_bf16'] else 'no'}; NNPACK {'yes' if summary['nnpack'] else 'no'}; oneDNN ISA "
        f"limit {summary['onednn_isa_limit'] or 'none'}; flags: {' '.join(summary['flags']) or 'none'}",
        highlight=False,
    )
    out.print(f"  --dtype auto on the CPU: {dtype_name(cpu_auto_dtype(cpu))}", highlight=False)
    out.print(f"CUDA: {cuda or 'not available'}", highlight=False)
    table = _table("model", "part", "CPU, --dtype auto", "CPU, --dtype fp32")
    for model_name, parts in plans.items():
        for part, choice in parts.items():
            table.add_row(model_name, part, choice.get("auto", choice.get("error", "")), choice.get("fp32", ""))
    out.print(table)


def torch_cuda_summary() -> str | None:
    """'NAME (bf16)' of the first CUDA device, or None."""
    import torch

    if not torch.cuda.is_available():
        return None
    return f"{torch.cuda.get_device_name(0)} ({'bf16' if torch.cuda.is_bf16_supported() else 'fp16'} under --dtype auto)"


@weights_app.command("list")
def weights_list() -> None:
    """Every registered checkpoint, its status, licence and the registry file that defines it."""
    table = _table("name", "engine", "format", "status", "licence", "defined in")
    for name, entry in registry.load_registry().entries.items():
        origin = "built-in" if entry.builtin else entry.where
        table.add_row(name, entry.engine, entry.format, weights_status(name), entry.licence, origin)
    out.print(table)


@weights_app.command("pull")
def weights_pull(names: Annotated[list[str], typer.Argument(help="Registry names, or model names.")]) -> None:
    """Download (or build from an installed wheel) the weights, verifying sha256."""
    for name in _expand_names(names):
        try:
            path = registry.resolve(name, log=lambda m: err.print(m, highlight=False), pull=True)
        except registry.WeightsError as exc:
            _fail(str(exc), code=1)
        out.print(f"{name}: {path}", highlight=False)


@weights_app.command("verify")
def weights_verify(names: Annotated[list[str] | None, typer.Argument(help="Default: all cached.")] = None) -> None:
    """Re-hash cached files against the registry."""
    reg = registry.load_registry()
    selected = _expand_names(names) if names else [n for n, e in reg.entries.items() if registry.is_cached(e)]
    bad = False
    for name in selected:
        for file, status in registry.verify(name):
            bad |= status in ("mismatch", "missing")
            out.print(f"{name}/{file}: {status}", highlight=False)
    if bad:
        raise typer.Exit(1)


@weights_app.command("path")
def weights_path(name: str) -> None:
    """Where an entry's files are: its cache folder ($SRKIT_HOME), or the folder a user entry points at."""
    try:
        entry = registry.load_registry().entry(name)
    except registry.WeightsError as exc:
        _fail(str(exc))
    print(registry.entry_dir(entry))


@weights_app.command("import")
def weights_import(
    name: str,
    file: Annotated[Path, typer.Argument(help="A checkpoint file, or a diffusers folder.")],
    as_path: Annotated[str | None, typer.Option("--as", help="Which file of the entry this is.")] = None,
) -> None:
    """Put a checkpoint you obtained elsewhere into the cache (verified when the registry knows its sha256)."""
    try:
        dest = registry.import_file(name, file, as_path)
    except registry.WeightsError as exc:
        _fail(str(exc), code=1)
    out.print(f"{name}: {dest}", highlight=False)


REGISTRY_OPTION_HELP = (
    "User registry file (default $SRKIT_HOME/weights.toml; a team's file is read when SRKIT_REGISTRY names it)."
)


@weights_app.command("add")
def weights_add(
    name: Annotated[str, typer.Argument(help="The name to use with --model.")],
    path: Annotated[Path, typer.Option("--path", help="A model folder (e.g. a training export) or a checkpoint file.")],
    engine: Annotated[str | None, typer.Option("--engine", help="The model that runs it (default: from the export's srkit_export.json).")] = None,
    sha256: Annotated[str | None, typer.Option("--sha256", help="auto: record every file's sha256 for `weights verify`; or the one file's known digest.")] = None,
    licence: Annotated[str | None, typer.Option("--licence", "--license", help="Licence note (default: from the export's config).")] = None,
    registry_file: Annotated[Path | None, typer.Option("--registry", help=REGISTRY_OPTION_HELP)] = None,
    replace: Annotated[bool, typer.Option("--replace", help="Replace an entry of that name (yours, a team's, or a built-in one).")] = False,
) -> None:
    """Name your own weights (e.g. `srkit finetune`'s export) so that upscale, benchmark, models and verify use them."""
    from srkit import api

    try:
        entry = api.add_model(name, path, engine=engine, sha256=sha256, licence=licence,
                              registry_file=registry_file, replace=replace)  # fmt: skip
    except (ValueError, registry.WeightsError) as exc:
        _fail(one_line(exc))
    target = registry_file or registry.user_registry_file()
    if entry is None:
        err.print(
            f"note: srkit does not read {target} yet; set {registry.REGISTRY_ENV}={target}", highlight=False
        )
        return
    hashed = "with sha256" if all(f.sha256 for f in entry.files) else "sizes only (--sha256 auto to hash)"
    out.print(f"{name}: {entry.engine} model, {len(entry.files)} file(s) in {entry.location}, {hashed}; "
              f"written to {entry.where}. Try `srkit upscale IMAGE --model {name}`", highlight=False)  # fmt: skip


@weights_app.command("remove")
def weights_remove(
    name: str,
    registry_file: Annotated[Path | None, typer.Option("--registry", help=REGISTRY_OPTION_HELP)] = None,
) -> None:
    """Remove your entry NAME from a user registry (the weights files themselves are kept)."""
    try:
        target = registry.remove_entry(name, registry_file)
    except registry.WeightsError as exc:
        _fail(one_line(exc))
    out.print(f"{name}: removed from {target}", highlight=False)


def _expand_names(names: list[str]) -> list[str]:
    """Model names expand to every registry entry they need."""
    reg = registry.load_registry()
    expanded: list[str] = []
    for name in names:
        if name in reg.entries:
            expanded.append(name)
        elif name in model_names():
            expanded += list(describe(name)[1].spec.weights)
        else:
            _fail(f"'{name}' is neither a weights entry nor a model; see `srkit weights list`")
    return list(dict.fromkeys(expanded))


@app.command()
def benchmark(
    sets: Annotated[list[str], typer.Option("--set", help="Dataset name(s); see --list-sets.")] = [],  # noqa: B006
    model: Annotated[list[str], typer.Option("-m", "--model", help="Model(s) to run; see `srkit models`.")] = [],  # noqa: B006
    lr: Annotated[Path | None, typer.Option("--lr", help="A local LR folder (with --hr for full-reference metrics).")] = None,
    hr: Annotated[Path | None, typer.Option("--hr", help="The matching ground-truth folder.")] = None,
    sr_dir: Annotated[Path | None, typer.Option("--sr-dir", help="Score outputs made by another tool.")] = None,
    sr_suffix: Annotated[str | None, typer.Option("--sr-suffix", help="--sr-dir names are the set's plus this, e.g. _out for x_out.png.")] = None,
    sr_pattern: Annotated[str | None, typer.Option("--sr-pattern", help="--sr-dir names as a pattern of {name}, e.g. 'SR_{name}_x4'.")] = None,
    baseline: Annotated[bool, typer.Option("--baseline/--no-baseline", help="Add the bicubic row.")] = True,
    metrics: Annotated[str | None, typer.Option("--metrics", help="Comma-separated: psnr,ssim,lpips,dists,niqe,musiq,maniqa,maniqa-pipal,clipiqa,fid (default: all).")] = None,
    out_dir: Annotated[Path, typer.Option("-o", "--out", help="Report folder (CSV, JSON, Markdown, plot, SR images).")] = Path("results/benchmark"),
    root: Annotated[Path | None, typer.Option("--root", help="Where the sets live (also $SRKIT_DATA).")] = None,
    limit: Annotated[int | None, typer.Option("--limit", help="Only the first N images of each set.")] = None,
    reuse: Annotated[bool, typer.Option("--reuse", help="Re-score cached SR images instead of re-running models.")] = False,
    seed: Annotated[int, typer.Option("--seed", help="Seed for stochastic models.")] = 0,
    device: Annotated[str, typer.Option("--device")] = "auto",
    dtype: Annotated[str, typer.Option("--dtype")] = "auto",
    tile: Annotated[str, typer.Option("--tile", help="Pixel tile size for GAN models: auto, N, 0.")] = "auto",
    option: Annotated[list[str], typer.Option("-O", "--option", help="Engine option key=value for every model.")] = [],  # noqa: B006
    list_sets: Annotated[bool, typer.Option("--list-sets", help="List the known datasets and exit.")] = False,
    quiet: Annotated[bool, typer.Option("-q", "--quiet")] = False,
) -> None:
    """Score models (or another tool's outputs) by the papers' protocol: quality, time and memory per image."""
    from srkit import distributed
    from srkit.bench import datasets, runner

    if list_sets:
        table = _table("set", "scale", "images", "ground truth", "licence", "title")
        for entry in datasets.list_sets():
            table.add_row(entry.name, f"x{entry.scale}", str(entry.images), "yes" if entry.has_gt else "no (NR only)",
                          entry.licence, entry.title)
        out.print(table)
        return
    log = (lambda message: None) if quiet else (lambda message: err.print(message, highlight=False, markup=False))
    try:
        if sr_suffix is not None and sr_pattern is not None:
            raise CliError("give --sr-suffix or --sr-pattern, not both")
        config = runner.BenchmarkConfig(
            sets=tuple(sets), lr_dir=lr, hr_dir=hr, sr_dir=sr_dir, models=tuple(model),
            sr_pattern=sr_pattern or "{name}" + (sr_suffix or ""), baseline=baseline,
            metrics=tuple(m.strip() for m in metrics.split(",")) if metrics else None, out_dir=out_dir, limit=limit,
            reuse=reuse, seed=seed, device=device, dtype=dtype, root=root, tile=tile,
            options=_engine_options(option), progress=not quiet, log=log,
        )  # fmt: skip
        with distributed.process_group():
            result = runner.run_benchmark(config)
    except (CliError, ValueError, KeyError, LookupError, registry.WeightsError) as exc:
        _fail(one_line(exc))
    for label, path in result.files.items():
        log(f"{label}: {path}")


@app.command()
def tag(
    inputs: Annotated[list[str], typer.Argument(help="Image files, folders or glob patterns.")],
    output: Annotated[Path | None, typer.Option("-o", "--output", help="Folder for the .txt files (default: beside each image).")] = None,
    tagger: Annotated[str, typer.Option("--tagger", help="dape (RAM + DAPE LoRA, as SeeSR/OSEDiff) or ram.")] = "dape",
    write_txt: Annotated[bool, typer.Option("--write-txt", help="Write {stem}.txt with the tags (SeeSR/RFSR training tag files).")] = False,
    recursive: Annotated[bool, typer.Option("-r", "--recursive", help="Descend into sub-folders.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print {file: tags} and the batch summary as JSON.")] = False,
    device: Annotated[str, typer.Option("--device", help="auto, cpu, cuda, cuda:N.")] = "auto",
    offline: Annotated[bool, typer.Option("--offline", help="Never touch the network.")] = False,
    quiet: Annotated[bool, typer.Option("-q", "--quiet")] = False,
) -> None:
    """Tag images with RAM / DAPE (the prompts' tags); one line per image, or .txt files with --write-txt."""
    try:
        check_choice(tagger, TAG_MODELS, "--tagger")  # before PyTorch loads
    except ValueError as exc:
        _fail(one_line(exc))
    from srkit.tagging import load_tagger, tag_paths

    log = (lambda message: None) if quiet or as_json else (lambda message: err.print(message, highlight=False, markup=False))

    def on_file(result: FileResult, done: int, total: int) -> None:
        if result.status == "failed":
            err.print(f"[red]failed[/] {escape(result.input)}: {escape(result.error or '')}", highlight=False)

    try:
        with _offline_env(offline):
            model = load_tagger(tagger, device=device, log=log)
        report, tags = tag_paths(inputs, model, output=output, write_txt=write_txt, recursive=recursive, warn=log,
                                 on_file=on_file)  # fmt: skip
    except (CliError, ValueError, KeyError, registry.WeightsError) as exc:
        _fail(one_line(exc))
    if as_json:
        print(json.dumps({"tags": tags, **report.to_json()}, indent=2))
    else:
        for path, text in tags.items():
            print(f"{path}\t{text}")
    if not report.results:
        _fail("no input images found", code=1)
    if not report.ok:
        raise typer.Exit(1)


# ---------------------------------------------------------------------------------------------------------------
app.command()(degrade)  # LR/HR pairs through the Real-ESRGAN degradation (srkit/degrade/)


# Training commands

RECIPE_HELP = "; ".join(f"{name}: {spec.description}" for name, spec in RECIPES.items() if spec.command == "finetune")
DISTILL_HELP = "; ".join(f"{name}: {spec.description}" for name, spec in RECIPES.items() if spec.command == "distill")


class _RecipeCommand(typer.core.TyperCommand):
    """`finetune` and `distill`: --help lists every built recipe's hyper-parameters, read from the recipe modules,
    which import PyTorch; so they are read when the help is shown, not when the command line starts."""

    def format_help(self, ctx: Any, formatter: Any) -> None:
        self.help = (self.help or "") + _settings_help(self.name or "")
        super().format_help(ctx, formatter)


@app.command(cls=_RecipeCommand)
def finetune(
    recipe: Annotated[str, typer.Option("--recipe", help=RECIPE_HELP)],
    data: Annotated[Path, typer.Option("--data", help="Folder of HR images (degraded on the fly).")],
    out: Annotated[Path, typer.Option("-o", "--out", help="Run folder: checkpoints/, export/, tensorboard/.")],
    steps: Annotated[int | None, typer.Option("--steps", min=1, help="Optimiser steps (default: the recipe's released value, listed below).")] = None,
    base: Annotated[Path | None, typer.Option("--base", help="Model to start from (naosd, vae16, cid, cida: SD2.1-base folder, default the registry's; cid/cida: an SD2.1-VAE16 folder from `finetune --recipe vae16` for the paper's GenDR; gdpo: the NAOSD export, required; rfsr: the SeeSR/ConsisSR weights, a registry name or a path; s3diff: SD-Turbo folder, default the registry's; consissr, consissr-clip: an official-layout ConsisSR checkpoint or an export folder, default the registry's).")] = None,
    text: Annotated[Path | None, typer.Option("--text", help="Folder with tokenizer/text_encoder/scheduler (default: registry sd21-text; s3diff: the --base folder).")] = None,
    prompt_embeds: Annotated[Path | None, typer.Option("--prompt-embeds", help="Precomputed prompt embeddings instead of a text encoder (`prompt`/`neg`; s3diff: `pos`/`neg`).")] = None,
    crop: Annotated[int | None, typer.Option("--crop", help="HR crop side (multiple of 4; default: the recipe's).")] = None,
    batch_size: Annotated[int | None, typer.Option("--batch-size", min=1, help="Images per process and step (default: the recipe's).")] = None,
    grad_accum: Annotated[int | None, typer.Option("--grad-accum", min=1, help="Micro-batches per optimiser step (default: the recipe's).")] = None,
    lr: Annotated[float | None, typer.Option("--lr", help="AdamW learning rate (default: the recipe's release: naosd/gdpo 5e-5, rfsr 5e-6, s3diff 2e-5, consissr 1e-4, vae16/cid/cida 1e-5).")] = None,
    max_grad_norm: Annotated[float | None, typer.Option("--max-grad-norm", help="Gradient clipping, 0: off (default: the recipe's).")] = None,
    mixed_precision: Annotated[str, typer.Option("--mixed-precision", help="no, fp16, bf16 (CUDA only).")] = "no",
    checkpoint_every: Annotated[int | None, typer.Option("--checkpoint-every", min=1, help="Steps between checkpoints (default: the recipe's).")] = None,
    ema: Annotated[float | None, typer.Option("--ema", help="EMA decay of the trained weights (0: off; default: the recipe's release, else off).")] = None,
    seed: Annotated[int, typer.Option("--seed", help="Seed of data order, crops, degradations and noise.")] = 123,
    resume: Annotated[bool, typer.Option("--resume", help="Continue from the newest checkpoint in --out.")] = False,
    tensorboard: Annotated[bool, typer.Option("--tensorboard", help="Also log to OUT/tensorboard.")] = False,
    device: Annotated[str, typer.Option("--device", help="auto or cpu. Several processes: `accelerate launch --multi_gpu -m srkit.cli finetune ...` (GPUs) or `torchrun --nproc_per_node N -m srkit.cli finetune ...` (CPU, gloo).")] = "auto",
    offline: Annotated[bool, typer.Option("--offline", help="Never touch the network.")] = False,
    reward_metrics: Annotated[str | None, typer.Option("--reward-metrics", help="gdpo: reward metrics, e.g. psnr,musiq,maniqa (the paper's).")] = None,
    option: Annotated[list[str], typer.Option("-O", "--option", help="Recipe hyper-parameter key=value (see the list below).")] = [],  # noqa: B006
) -> None:
    """Fine-tune or pre-train a model with a paper's recipe; the export loads with `srkit upscale --weights`, or by
    name after `srkit weights add NAME --path OUT/export`.  Options left out take the recipe's released values."""
    _train("finetune", locals())


def _train(command: str, arguments: dict[str, Any]) -> None:
    """The body of `finetune` and `distill`: one set of options, recipes of the named command only."""
    config = {key: arguments[name] for key, name in (
        ("steps", "steps"), ("batch_size", "batch_size"), ("grad_accum", "grad_accum"), ("lr", "lr"),
        ("max_grad_norm", "max_grad_norm"), ("mixed_precision", "mixed_precision"),
        ("checkpoint_every", "checkpoint_every"), ("ema_decay", "ema"), ("seed", "seed"), ("resume", "resume"),
        ("tensorboard", "tensorboard"),
    ) if arguments[name] is not None}  # fmt: skip
    try:
        check_recipe(arguments["recipe"], command)  # a wrong name is refused before PyTorch loads
    except ValueError as exc:
        _fail(one_line(exc), code=2)
    from srkit.train.run import finetune as run_recipe

    try:
        settings = _engine_options(arguments["option"])
        if arguments["reward_metrics"] is not None:
            settings["reward_metrics"] = arguments["reward_metrics"]
        exported = run_recipe(
            arguments["recipe"], data=arguments["data"], out=arguments["out"], base=arguments["base"],
            text=arguments["text"], prompt_embeds=arguments["prompt_embeds"], crop=arguments["crop"], config=config,
            settings=settings, device=arguments["device"], offline=arguments["offline"], command=command,
        )  # fmt: skip
    except (CliError, ValueError, KeyError, registry.WeightsError) as exc:
        _fail(one_line(exc), code=2)
    err.print(
        f"done: {exported} (to use it by name: srkit weights add NAME --path {exported})", highlight=False
    )


def _settings_help(command: str) -> str:
    """Every built recipe's hyper-parameters with their paper defaults and its released training setup, for the
    command's --help."""
    paragraphs = []
    for name in built_recipes(command):
        lines = describe_settings(name).splitlines()
        paragraphs.append(f"{name} hyper-parameters (-O key=value, paper defaults): " + "; ".join(lines))
        if training := describe_training(name):
            paragraphs.append(f"{name} training (released): {training}")
    return "".join(f"\n\n{escape(text)}" for text in paragraphs)


def distill(**arguments: Any) -> None:
    _train("distill", arguments)


def _distill_signature() -> inspect.Signature:
    """`finetune`'s options, with the distillation recipes in --recipe's help."""
    signature = inspect.signature(finetune, eval_str=True)
    recipe = Annotated[str, typer.Option("--recipe", help=DISTILL_HELP)]
    parameters = [p.replace(annotation=recipe) if p.name == "recipe" else p for p in signature.parameters.values()]
    return signature.replace(parameters=parameters)


distill.__signature__ = _distill_signature()
distill.__doc__ = (
    "Distil a one-step GenDR model (CiD / CiDA) from a diffusion base; the result loads with "
    "`srkit upscale --model gendr --weights OUT/export`. --recipe: " + DISTILL_HELP + ". "
    "Same options as `finetune`; --lr defaults to the paper's 1e-5."
)
app.command(cls=_RecipeCommand)(distill)


def main() -> None:
    try:
        app()
    except KeyboardInterrupt:
        err.print("interrupted")
        sys.exit(130)


if __name__ == "__main__":
    main()
