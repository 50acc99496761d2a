"""``noisescore`` command line. Flags map one-to-one onto :class:`CleanSettings` fields."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import Any

from pydantic import ValidationError

from noisescore import __version__

EXIT_USAGE = 2


def _add_clean(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "clean",
        help="score and correct the labels of a dataset with LiNC",
        description="Train with LiNC, flag and correct noisy labels, and write report.json, "
        "trust.csv, trust_by_epoch.npy and model.pt into --out. Unset flags fall back "
        "to NOISESCORE_<FLAG> environment variables, then to the paper's defaults.",
        argument_default=argparse.SUPPRESS,
    )
    p.add_argument("--dataset", help="MedMNIST name (breastmnist) or path to .npz / .csv")
    p.add_argument(
        "--data-dir",
        help="where names are looked up (default: $NOISESCORE_DATA_DIR, ../shared/data, ./data)",
    )
    p.add_argument("--image-size", type=int, help="resize images to this square size")
    p.add_argument(
        "--noise",
        help="inject noise KIND:RATE for evaluation: symmetric, uniform, "
        "pairflip, instance (e.g. uniform:0.5), or asymmetric:FILE",
    )
    p.add_argument("--noise-val", action="store_true", help="inject noise into val too")
    p.add_argument("--seed", type=int)
    p.add_argument("--epochs", type=int, help="total epochs (default 100)")
    p.add_argument("--warmup-epochs", type=int, help="LiNC warm-up epochs (default 10)")
    p.add_argument("--model", help="timm model name (default noisescore_cnn)")
    p.add_argument("--checkpoint", help="local pretrained weights for --model")
    p.add_argument("--batch-size", type=int)
    p.add_argument("--lr", type=float, help="Adam learning rate (default 1e-4)")
    p.add_argument("--weight-decay", type=float)
    p.add_argument(
        "--lr-milestones",
        type=lambda s: tuple(int(x) for x in s.split(",")),
        help="comma-separated epochs where the LR drops x0.1 (default E/2,3E/4)",
    )
    p.add_argument("--augment", action="store_true", help="random horizontal flips")
    p.add_argument("--alpha-lr", type=float, help="LiNC trust learning rate (default 1)")
    p.add_argument("--alpha-wd", type=float, help="LiNC trust weight decay (default 1e-3)")
    p.add_argument(
        "--alpha-grad",
        choices=["mean", "sample"],
        help="trust gradient of the batch-mean loss (default) or per-sample loss",
    )
    p.add_argument(
        "--baseline", action="store_true", help="also train plain cross-entropy with the same seed"
    )
    p.add_argument("--device", choices=["auto", "cpu", "cuda"])
    p.add_argument("--out", required=True, default=argparse.SUPPRESS, help="output directory")
    p.add_argument("--quiet", action="store_true", default=False, help="no progress bar")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="noisescore", description="Find and correct noisy labels in medical images."
    )
    parser.add_argument("--version", action="version", version=f"noisescore {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_clean(sub)
    return parser


def _summary(report: dict[str, Any], out: str) -> str:
    d, linc, test = report["dataset"], report["linc"], report.get("test") or {}
    lines = [
        f"dataset   {d['name']}: {d['n_train']} train, {d['n_classes']} classes",
    ]
    if report.get("noise"):
        n = report["noise"]
        lines.append(f"noise     {n['kind']}:{n['rate']} realised {n['realised_rate']:.3f}")
    lines.append(
        f"LiNC      Otsu threshold {linc['otsu_threshold']:.4f}, "
        f"flagged {linc['n_flagged']}, relabelled {linc['n_changed']}"
    )
    if "detection" in linc:
        det = linc["detection"]
        auroc = "n/a" if det["auroc"] is None else f"{det['auroc']:.3f}"
        lines.append(
            f"detection AUROC {auroc}, precision {det['precision']:.3f}, "
            f"recall {det['recall']:.3f}; label accuracy "
            f"{linc['label_accuracy_before']:.3f} -> {linc['label_accuracy_after']:.3f}"
        )
    if test:
        lines.append(f"test      accuracy {test['accuracy']:.3f}, macro-F1 {test['macro_f1']:.3f}")
    if report.get("baseline"):
        lines.append(f"baseline  test accuracy {report['baseline']['test']['accuracy']:.3f}")
    lines.append(f"written   {out}/report.json, trust.csv, trust_by_epoch.npy, model.pt")
    return "\n".join(lines)


def _clean(args: argparse.Namespace) -> int:
    from noisescore.ml.clean import run_clean
    from noisescore.ml.outputs import check_out_dir, write_outputs
    from noisescore.settings import CleanSettings

    fields = {k: v for k, v in vars(args).items() if k not in ("command", "out", "quiet")}
    settings = CleanSettings(**fields)
    check_out_dir(args.out)  # fail before training, not after it
    result = run_clean(settings, progress=not args.quiet)
    write_outputs(result, args.out)
    print(_summary(result.report, args.out))
    return 0


def _format_validation(err: ValidationError) -> str:
    parts = []
    for e in err.errors():
        where = ".".join(str(x) for x in e["loc"])
        msg = e["msg"].removeprefix("Value error, ")
        # Model-level checks (e.g. warm-up vs epochs) have no location: no "--" prefix then.
        parts.append(f"--{where.replace('_', '-')}: {msg}" if where else msg)
    return "; ".join(parts)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if args.command == "clean":
            return _clean(args)
    except ValidationError as err:
        print(f"noisescore: error: {_format_validation(err)}", file=sys.stderr)
    except (ValueError, NotADirectoryError) as err:  # DataError, NoiseSpecError, ModelError...
        print(f"noisescore: error: {err}", file=sys.stderr)
    except KeyboardInterrupt:
        print("noisescore: interrupted; no report.json was written", file=sys.stderr)
        return 130
    return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
