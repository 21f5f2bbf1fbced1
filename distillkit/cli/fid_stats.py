"""``distillkit fid-stats``: compute a dataset's FID reference statistics once into the cache."""

from __future__ import annotations

import argparse
import sys

from ..errors import ConfigError


def add_parser(subparsers) -> None:
    from ..fid import DEFAULT_REFERENCE_IMAGES

    parser = subparsers.add_parser(
        "fid-stats", help="compute a dataset's FID reference statistics once (cached)",
        description="Inception features of a dataset's training images -> mean and covariance, cached under "
                    "$DISTILLKIT_CACHE/fid (default ~/.cache/distillkit/fid) with a JSON sidecar saying how they "
                    "were made. distillkit eval --metric fid reads them.",
    )
    parser.add_argument("--dataset", required=True, metavar="D", help="a registered dataset (distillkit plugins)")
    parser.add_argument("--data-root", default="", metavar="DIR", help="directory holding the dataset files")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="a dataset option, e.g. dataset_options.download=true")
    parser.add_argument("--n", default=str(DEFAULT_REFERENCE_IMAGES), metavar="N",
                        help=f"training images to use (all there are, if fewer; default {DEFAULT_REFERENCE_IMAGES})")
    parser.add_argument("--seed", default="0", metavar="S", help="which images, when the dataset has more than N (default 0)")
    parser.add_argument("--inception-weights", default="", metavar="FILE",
                        help="the TorchScript Inception file (default: $DISTILLKIT_INCEPTION_WEIGHTS, else clean-fid's download)")
    parser.add_argument("--device", default="cpu", metavar="DEVICE", help="cpu, cuda, cuda:N or auto (default: cpu)")
    parser.add_argument("--batch-size", default="64", metavar="B", help="images per Inception batch (default 64)")
    parser.add_argument("--force", action="store_true", help="recompute even when the cache holds them")


def dataset_options(overrides: list[str]) -> dict:
    from ..config import parse_literal

    options: dict = {}
    for item in overrides:
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or not key.startswith("dataset_options.") or len(key) <= len("dataset_options."):
            raise ConfigError("--set", item, "dataset_options.KEY=VALUE")
        options[key[len("dataset_options."):]] = parse_literal(value.strip())
    return options


def command(args: argparse.Namespace, extractor=None) -> int:
    from .. import fid
    from ..config import build_attrs
    from ..plugin_manager import get_registries
    from ..resolve import lookup
    from ..arguments import check_device, parse_positive, parse_seed

    n = parse_positive(args.n, "--n")
    seed = parse_seed(args.seed, "--seed")
    batch_size = parse_positive(args.batch_size, "--batch-size")
    options = dataset_options(args.overrides)
    cls = lookup(get_registries().datasets, "--dataset", args.dataset)
    config = build_attrs(cls.config_class, options, "dataset_options.")
    device = check_device(args.device)
    dataset = cls(config, args.data_root or None)
    if not dataset.spec.is_image:
        raise ConfigError("--dataset", args.dataset, f"an image dataset; {args.dataset} samples have shape {dataset.spec.shape}")
    extractor = extractor or fid.inception_extractor(args.inception_weights, device)
    last = [0]

    def progress(done: int, total: int) -> None:
        if done - last[0] >= max(1, total // 10) or done == total:
            last[0] = done
            print(f"  features {done}/{total}", file=sys.stderr, flush=True)

    stats, computed = fid.reference_stats(
        dataset, args.dataset, extractor, n=n, seed=seed, batch_size=batch_size, force=args.force,
        describe={"dataset_options": options, "data_root": args.data_root}, progress=progress,
    )
    verb = "computed" if computed else "already cached (use --force to recompute)"
    print(f"FID reference statistics for {args.dataset} ({stats.n} training images, {extractor.name}) {verb}:",
          file=sys.stderr)
    print(stats.path)
    print(stats.path.with_suffix(".json"))
    return 0
