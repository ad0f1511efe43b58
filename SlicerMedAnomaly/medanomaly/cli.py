"""The `medanomaly` command. Every flag of `detect` is a keyword of `medanomaly.detect`."""

from __future__ import annotations

import argparse
import gc
import json
import logging
import os
import sys
import time

from . import __version__

log = logging.getLogger("medanomaly")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="medanomaly", description="Unsupervised anomaly detection in CT volumes.")
    p.add_argument("--version", action="version", version=f"medanomaly {__version__}")
    p.add_argument("--debug", action="store_true", help="show tracebacks and debug logging")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress bar, warnings and errors only")
    sub = p.add_subparsers(dest="command", required=True)

    d = sub.add_parser("detect", help="detect anomalies in CT volumes and write Slicer-ready results")
    d.add_argument("inputs", nargs="+", metavar="INPUT",
                   help="NIfTI/NRRD/MHA files, DICOM folders or multi-frame (enhanced) DICOM CT files")
    d.add_argument("-o", "--output", default="medanomaly-out", help="output folder; results go to OUT/<case>/")
    d.add_argument("--model", default=None, help="model name from the catalog, a bundle folder, or ensemble:NAME1,NAME2 "
                   "(mean of calibrated maps) / ensemble-max:NAME1,NAME2 / ensemble-max-rate:NAME1,NAME2 (maximum after "
                   "matching members by false-finding rate), or a recommended ensemble's name such as "
                   "chest-ct-nodules-needles (`medanomaly models list`; default: catalog default)")
    d.add_argument("--device", default="auto", help="auto, cpu, cuda or mps (default auto: CUDA when present)")
    d.add_argument("--sensitivity", type=float, default=None,
                   help="0..1: higher finds more, with more false positives (0.5 = 0.32 false findings per normal volume)")
    d.add_argument("--fp-rate", type=float, default=None,
                   help="target false-positive findings per normal volume (overrides --sensitivity)")
    d.add_argument("--min-size-mm3", type=float, default=None, help="smallest finding kept (default: model card)")
    d.add_argument("--mood", action="store_true", help="also write MOOD challenge files under OUT/mood/")
    d.add_argument("--series", default=None, help="DICOM SeriesInstanceUID when a folder holds several series")
    d.add_argument("--allow-non-hu", action="store_true", help="warn instead of refusing values that are not HU")
    d.add_argument("--max-memory-gb", type=float, default=None, help="refuse volumes needing more (default: 80%% of free)")
    d.add_argument("--memory-budget-mb", type=float, default=1024.0, help="memory for one batch of slices")
    d.add_argument("--no-overview", action="store_true", help="skip overview.png")
    d.add_argument("--progress-lines", action="store_true",
                   help="print 'PROGRESS <stage> <fraction>' lines on stdout (for the Slicer module)")

    m = sub.add_parser("models", help="list, show or import model bundles")
    msub = m.add_subparsers(dest="models_command", required=True)
    msub.add_parser("list", help="models in the catalogs")
    show = msub.add_parser("show", help="a model's card")
    show.add_argument("name")
    imp = msub.add_parser("import", help="verify a bundle folder and copy it into the user model cache")
    imp.add_argument("path")
    dl = msub.add_parser("download", help="download a bundle archive (only when you ask), check its SHA-256 and "
                                          "import it into the user model cache")
    dl.add_argument("url", help="address of a .zip/.tar.gz of a bundle folder")
    dl.add_argument("--sha256", required=True, help="the SHA-256 of the archive, published with the model")

    sub.add_parser("info", help="versions, devices and model folders")

    t = sub.add_parser("train", help="train a model bundle on normal CT volumes")
    t.add_argument("--method", required=True,
                   help="vqvae-recon, vqvae-fs, hu-outlier, shape-outlier, deep-knn, stylegan2, stylegan2-encoder")
    t.add_argument("--init-from", default=None,
                   help="start from another bundle's weights (stylegan2-encoder: the stylegan2 bundle)")
    t.add_argument("--data", nargs="+", required=True, help="normal CT volumes (files or DICOM folders)")
    t.add_argument("-o", "--output", required=True, help="bundle folder to write")
    t.add_argument("--calibration-data", nargs="*", default=[], help="held-out normal volumes for calibration")
    t.add_argument("--name", default=None, help="model name (default: output folder name)")
    t.add_argument("--steps", type=int, default=None)
    t.add_argument("--batch-size", type=int, default=None)
    t.add_argument("--learning-rate", type=float, default=None)
    t.add_argument("--seed", type=int, default=None)
    t.add_argument("--input-json", default=None, help="input spec as JSON, e.g. '{\"size\": 128, ...}'")
    t.add_argument("--architecture-json", default=None, help="network keyword overrides as JSON")
    t.add_argument("--description", default=None)
    t.add_argument("--device", default="auto")
    t.add_argument("--resume", action="store_true", help="continue from OUTPUT.checkpoint/ if present")
    c = sub.add_parser("calibrate", help="refit a bundle's calibration on normal CT without retraining")
    c.add_argument("--model", required=True, help="bundle folder")
    c.add_argument("--data", nargs="*", default=[], help="volumes to split into held-out slabs (default: the card's)")
    c.add_argument("--calibration-data", nargs="*", default=[], help="whole normal volumes to calibrate on")
    c.add_argument("-o", "--output", default=None, help="write the recalibrated bundle here (default: in place)")
    b = sub.add_parser("batch", help="detect over many scans (resumable), ranked in OUT/summary.csv")
    b.add_argument("inputs", nargs="+", metavar="INPUT", help="folders (searched recursively), globs or a CSV manifest")
    b.add_argument("-o", "--output", required=True)
    b.add_argument("--model", default=None)
    b.add_argument("--workers", type=int, default=2, help="local worker processes (default 2)")
    b.add_argument("--memory-limit", default="3GB", help="memory bound of each local worker (Dask syntax)")
    b.add_argument("--threads-per-worker", type=int, default=None,
                   help="torch threads in each worker (default: local CPU cores / workers; on a cluster, torch's own)")
    b.add_argument("--scheduler", default=None, help="address of a running Dask scheduler (tcp://host:8786)")
    b.add_argument("--device", default="cpu")
    b.add_argument("--sensitivity", type=float, default=None)
    b.add_argument("--min-size-mm3", type=float, default=None)
    b.add_argument("--mood", action="store_true")
    b.add_argument("--allow-non-hu", action="store_true")
    b.add_argument("--no-overview", action="store_true")
    b.add_argument("--each-series", action="store_true",
                   help="every CT series of a DICOM folder is a case (default: a folder is one case, its largest CT "
                        "series)")

    x = sub.add_parser("explain", help="latent direction between flagged and unflagged slices, with counterfactuals "
                                       "(stylegan2 models)")
    x.add_argument("input", help="a CT volume (file or DICOM folder)")
    x.add_argument("-o", "--output", required=True, help="folder for explain.json, counterfactuals.png and volumes")
    x.add_argument("--model", required=True, help="a stylegan2 model (catalog name or bundle folder)")
    x.add_argument("--labels", default=None,
                   help="label volume on the CT's grid: slices with any label form group 1 (default: flagged slices)")
    x.add_argument("--slices", default=None, help="comma-separated canonical slice indices to render (default: top 3)")
    x.add_argument("--lambdas", default=None, help="comma-separated steps along the direction (default -3,-1.5,0,1.5,3)")
    x.add_argument("--steps", type=int, default=None, help="inversion steps (default: the model card's)")
    x.add_argument("--device", default="cpu")

    e = sub.add_parser("evaluate", help="score a model on the anomaly lab's cases (metrics as JSON and Markdown)")
    e.add_argument("--cases", required=True, help="folder with cases.json (see scripts/benchmark_lab.py)")
    e.add_argument("--model", default=None, help="model name or bundle folder (default: catalog default)")
    e.add_argument("--device", default="cpu")
    e.add_argument("--calibration", choices=("auto", "cross", "card"), default="auto",
                   help="cross: score each case group with the model recalibrated on the other groups' normal cases "
                        "(out of sample); card: the model card's calibration; auto (default): cross when possible")
    e.add_argument("--json", default=None, help="write the metrics here")
    e.add_argument("--markdown", default=None, help="write the tables here")
    return p


class ProgressPrinter:
    """A tqdm bar per stage on stderr, or machine-readable lines on stdout."""

    def __init__(self, quiet: bool, lines: bool):
        self.quiet, self.lines, self.bar, self.stage = quiet, lines, None, None

    def __call__(self, stage: str, fraction: float) -> None:
        if self.lines:
            print(f"PROGRESS {stage} {fraction:.3f}", flush=True)
            return
        if self.quiet:
            return
        from tqdm import tqdm

        if stage != self.stage:
            self.close()
            self.stage = stage
            self.bar = tqdm(total=100, desc=f"{stage:>11}", leave=False, file=sys.stderr,
                            bar_format="{desc}: {percentage:3.0f}%|{bar}| {elapsed}<{remaining}")
        self.bar.n = int(round(fraction * 100))
        self.bar.refresh()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def format_probability(significance: float) -> str:
    """A probability given as its significance -log10(1 - p): 0.9990 or, far in the tail, 1 - 6.6e-08."""
    return f"{1.0 - 10.0 ** -significance:.4f}" if significance < 4 else f"1 - {10.0 ** -significance:.2g}"


def findings_table(result) -> str:
    rows = [f"{result.volume.case_name}: volume score {result.volume_score:.3f} (p {result.volume_p_value:.2g}), "
            f"{len(result.findings)} finding(s) at probability >= {format_probability(result.threshold_significance)}"
            f" ({result.output_dir or 'not written'})"]
    if result.findings:
        ensemble = "members" in result.model  # then which member flagged each finding
        rows.append(f"{'id':>3} {'p-value':>8} {'max p':>13} {'vol mm3':>9} {'mean HU':>8}  centroid RAS mm"
                    "            slices k" + ("    flagged by" if ensemble else ""))
        for f in result.findings[:20]:
            ras = ", ".join(f"{v:7.1f}" for v in f["centroid_ras_mm"])
            p_value = f"{f['p_value']:8.2g}" if "p_value" in f else f"{'':8}"
            slices = f"{f['slice_range_k'][0]}-{f['slice_range_k'][1]}"
            rows.append(f"{f['id']:>3} {p_value} {format_probability(f['peak_significance']):>13} "
                        f"{f['volume_mm3']:9.1f} {f['mean_hu']:8.1f}  ({ras})  "
                        + (f"{slices:<8}  {f['flagged_by']}" if ensemble else slices))
        if len(result.findings) > 20:
            rows.append(f"... {len(result.findings) - 20} more in findings.json")
        rows.append("p-value: the chance that a normal volume of this length has a finding as strong")
    return "\n".join(rows)


def _cmd_detect(args) -> int:
    from .api import detect

    printer = ProgressPrinter(args.quiet, args.progress_lines)
    try:
        results = detect(args.inputs, args.output, model=args.model, device=args.device,
                         sensitivity=args.sensitivity, fp_rate=args.fp_rate, min_size_mm3=args.min_size_mm3,
                         mood=args.mood, series=args.series, allow_non_hu=args.allow_non_hu,
                         max_memory_gb=args.max_memory_gb, memory_budget_mb=args.memory_budget_mb,
                         overview=not args.no_overview, progress=printer)
    finally:
        printer.close()
    if not args.quiet:
        for result in results:
            print(findings_table(result))
    return 0


def _cmd_models(args) -> int:
    from .bundle import download_model, import_model, list_ensembles, list_models, resolve_model

    if args.models_command == "list":
        models = list_models()
        if not models:
            print("no models installed; import one with `medanomaly models import BUNDLE`")
        for m in models:
            flag = " (default)" if m.get("default") else ""
            print(f"{m['name']}{flag}: {m['method']} {m['version']}, {m['body_region']} - {m['catalog']}")
        for e in list_ensembles():
            alias = f"{e['alias']} = " if e.get("alias") else ""
            print(f"{alias}{e['name']}: recommended ensemble, {e['body_region']} - {e['description']}")
    elif args.models_command == "show":
        bundle = resolve_model(args.name)
        card = {k: v for k, v in bundle.card.items() if k != "calibration"}
        card["calibration"] = {k: v for k, v in bundle.card["calibration"].items()
                               if not isinstance(v, list)}
        print(json.dumps(dict(card, path=str(bundle.path)), indent=2))
    elif args.models_command == "download":
        printer = ProgressPrinter(args.quiet, False)
        try:
            bundle = download_model(args.url, args.sha256, progress=printer)
        finally:
            printer.close()
        print(f"downloaded, verified and imported {bundle.model_id} into {bundle.path}")
    else:
        bundle = import_model(args.path)
        print(f"imported {bundle.model_id} into {bundle.path}")
    return 0


def _cmd_info(args) -> int:
    import numpy
    import SimpleITK
    import torch

    from .bundle import model_dirs

    lines = [f"medanomaly {__version__}", f"python {sys.version.split()[0]}", f"torch {torch.__version__}",
             f"numpy {numpy.__version__}", f"SimpleITK {SimpleITK.Version.VersionString()}"]
    from importlib.metadata import PackageNotFoundError, version

    for package in ("monai", "highdicom", "pydicom", "python-gdcm", "dask", "faiss-cpu"):  # optional or lazily imported
        try:
            lines.append(f"{package} {version(package)}")
        except PackageNotFoundError:
            lines.append(f"{package}: not installed")
    cuda = torch.cuda.is_available()
    lines.append(f"CUDA: {'available, ' + torch.cuda.get_device_name(0) + ', CUDA ' + str(torch.version.cuda) if cuda else 'not available'}")
    mps = getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()
    lines.append(f"MPS: {'available' if mps else 'not available'}")
    lines.append(f"CPU threads: {torch.get_num_threads()}")
    lines.append("model folders (searched in order): " + os.pathsep.join(str(d) for d in model_dirs()))
    print("\n".join(lines))
    return 0


def _cmd_train(args) -> int:
    from pathlib import Path

    from .training import train

    overrides = {k: v for k, v in {"steps": args.steps, "batch_size": args.batch_size,
                                   "learning_rate": args.learning_rate, "seed": args.seed,
                                   "description": args.description, "device": args.device}.items() if v is not None}
    overrides["name"] = args.name or Path(args.output).name
    if args.input_json:
        from .training import default_input

        overrides["input"] = {**default_input(), **json.loads(args.input_json)}
    if args.architecture_json:
        overrides["architecture"] = json.loads(args.architecture_json)
    bar = None
    last = [time.perf_counter()]

    def progress(step, total, parts):
        nonlocal bar
        if args.quiet:
            return
        from tqdm import tqdm

        if bar is None:
            bar = tqdm(total=total, initial=step - 1, desc="training", unit="step", file=sys.stderr)
        bar.update(1)
        if time.perf_counter() - last[0] > 1.0:
            bar.set_postfix({k: f"{float(v):.4f}" for k, v in parts.items()})
            last[0] = time.perf_counter()

    if args.init_from:
        overrides["init_from"] = args.init_from
        if args.method == "stylegan2-encoder":
            if not args.architecture_json:  # the generator's architecture comes with its weights
                from .bundle import resolve_model

                overrides["architecture"] = resolve_model(args.init_from).card["architecture"]
    bundle = train(args.method, args.data, args.output, calibration_data=args.calibration_data, resume=args.resume,
                   progress=progress, **overrides)
    if bar is not None:
        bar.close()
    if bundle is not None:  # under torchrun only rank 0 writes the bundle
        print(f"wrote {bundle.model_id} to {bundle.path}")
    return 0


def _cmd_calibrate(args) -> int:
    from .training import recalibrate

    bundle = recalibrate(args.model, data=args.data, calibration_data=args.calibration_data, output=args.output)
    cal = bundle.card["calibration"]
    print(f"recalibrated {bundle.model_id} on {cal['reference_slices']} slices ({cal['source']}) -> {bundle.path}")
    return 0


def _cmd_batch(args) -> int:
    from .batch import batch
    from .report import status_counts

    printer = ProgressPrinter(args.quiet, False)
    try:
        rows = batch(args.inputs, args.output, model=args.model, workers=args.workers,
                     memory_limit=args.memory_limit, scheduler=args.scheduler, progress=printer, device=args.device,
                     sensitivity=args.sensitivity, min_size_mm3=args.min_size_mm3, mood=args.mood,
                     allow_non_hu=args.allow_non_hu, overview=not args.no_overview, each_series=args.each_series,
                     **({"threads": args.threads_per_worker} if args.threads_per_worker is not None else {}))
    finally:
        printer.close()
    counts = status_counts(rows)
    print(f"{len(rows)} case(s): {counts['ok']} done, {counts['skipped']} already complete, {counts['failed']} "
          f"failed -> {args.output}/summary.csv and report.html")
    return 0 if counts["failed"] == 0 else 4


def _cmd_evaluate(args) -> int:
    from pathlib import Path

    from .lab import evaluate, markdown_breakdown, markdown_table

    printer = ProgressPrinter(args.quiet, False)
    try:
        result = evaluate(args.cases, args.model, device=args.device, progress=printer,
                          calibration=args.calibration)
    finally:
        printer.close()
    tables = markdown_table([result]) + "\n\n" + markdown_breakdown([result])
    print(tables)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2, default=float) + "\n")
    if args.markdown:
        Path(args.markdown).write_text(tables + "\n", encoding="utf-8")
    return 0


def _cmd_explain(args) -> int:
    from .explain import DEFAULT_LAMBDAS, explain
    from .errors import InputError

    def numbers(text, kind):
        try:
            return [kind(v) for v in text.split(",") if v.strip()]
        except ValueError:
            raise InputError(f"{text!r}: give comma-separated numbers") from None

    summary = explain(args.input, args.output, model=args.model, labels=args.labels,
                      slices=numbers(args.slices, int) if args.slices else None,
                      lambdas=tuple(numbers(args.lambdas, float)) if args.lambdas else DEFAULT_LAMBDAS,
                      steps=args.steps, device=args.device)
    print(f"direction from {summary['slices_flagged']} flagged vs {summary['slices_unflagged']} other slices: "
          f"cross-validated AUC {summary['cv_auc']:.3f} -> {args.output}")
    return 0


COMMANDS = {"explain": _cmd_explain, "batch": _cmd_batch, "evaluate": _cmd_evaluate, "detect": _cmd_detect, "models": _cmd_models, "info": _cmd_info, "train": _cmd_train,
            "calibrate": _cmd_calibrate}


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.debug else (logging.WARNING if args.quiet else logging.INFO),
                        format="medanomaly: %(levelname)s: %(message)s", stream=sys.stderr)
    from .errors import MedAnomalyError

    try:
        return COMMANDS[args.command](args)
    except MedAnomalyError as exc:
        if args.debug:
            raise
        print(f"medanomaly: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("medanomaly: interrupted; nothing half-written was left", file=sys.stderr)
        return 130
    except MemoryError:
        if args.debug:
            raise
        print("medanomaly: error: out of memory; lower --memory-budget-mb or crop the volume", file=sys.stderr)
        return 3
    except Exception as exc:  # a bug or an unforeseen input: still one line, details with --debug
        if args.debug:
            raise
        message = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else ""
        print(f"medanomaly: error: unexpected {type(exc).__name__}: {message} (run with --debug for details)",
              file=sys.stderr)
        return 1


def run() -> None:
    """The `medanomaly` command. A process that has loaded torch, MONAI and a model spends about 0.8 s at exit in
    Python's last garbage collections over those objects; frozen, they are skipped (0.1 s)."""
    code = main()
    gc.freeze()
    sys.exit(code)


if __name__ == "__main__":
    run()
