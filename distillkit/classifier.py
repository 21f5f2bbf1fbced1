"""An offline image metric: the Fréchet distance in the feature space of a small classifier that
distillkit trains itself (``classifier_fd``).

FID needs Inception weights that must be downloaded; for small labelled image datasets (the
built-in ``digits``, ``mnist``, ``fashion-mnist``) a small CNN trained on the dataset's own labels
gives features that separate good samples from bad ones, and needs nothing but the data. Which
datasets have one, and how it is trained, is the dataset's business: ``Dataset.classifier_recipe()``
(epochs, batch size, learning rate, optionally the held-out fraction) and
``Dataset.labelled_images()``; the core knows no dataset by name.

The classifier is trained deterministically (fixed seed, fixed epochs, fixed data order) from a
*recipe*: the architecture version, the dataset's training settings and a hash of the training
data, hashed into the file name, so a cached classifier is reused exactly when the same recipe
would produce it, and a changed recipe never reads a stale file.

Files: ``<cache>/classifiers/classifier-<dataset>-v<version>-<recipe hash>.pt`` (state dict and
recipe; read with ``weights_only=True``) and a ``.json`` sidecar (recipe, held-out accuracy, date).
Numbers are comparable between runs that used the same classifier file name.
"""

from __future__ import annotations

import datetime
import hashlib
import io
import json
import sys
import time
from pathlib import Path
from typing import Any, Callable, Optional

import attrs
import torch
from torch import nn

from .errors import UsageError
from .evaluation.cache import cache_dir
from .files import write_atomic

#: Bump when the architecture or the training loop changes: old files are then never reused.
VERSION = 1
ARCHITECTURE = "smallcnn-c16s1-c32s2-c64s2-pool2-f64"
FEATURE_DIM = 64
_FORMAT = "distillkit-classifier"
SEED = 0
#: The held-out fraction unless the dataset's recipe gives one (``holdout``).
HOLDOUT_FRACTION = 0.1


class SmallCNN(nn.Module):
    """Three 3x3 convolutions (the last two with stride 2), a 2x2 average pool, a 64-d feature
    layer and a linear classifier. About 40 k parameters; a forward pass of a 28x28 image costs
    ~2 M multiply-adds."""

    def __init__(self, channels: int, num_classes: int):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(channels, 16, 3, padding=1), nn.ReLU(),
            nn.Conv2d(16, 32, 3, stride=2, padding=1), nn.ReLU(),
            nn.Conv2d(32, 64, 3, stride=2, padding=1), nn.ReLU(),
            nn.AdaptiveAvgPool2d(2), nn.Flatten(),
            nn.Linear(64 * 4, FEATURE_DIM), nn.ReLU(),
        )
        self.head = nn.Linear(FEATURE_DIM, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


@attrs.frozen
class Classifier:
    model: SmallCNN
    path: Path
    recipe: dict
    holdout_accuracy: float

    @property
    def name(self) -> str:
        return self.path.stem

    @torch.no_grad()
    def features(self, images: torch.Tensor, batch_size: int = 1000) -> torch.Tensor:
        """Features ``[N, 64]`` of images in [-1, 1] (clamped to that range first)."""
        self.model.eval()
        parts = [self.model.features(chunk.clamp(-1, 1).float()) for chunk in images.split(batch_size)]
        return torch.cat(parts)


def dataset_recipe(dataset: Any, dataset_name: str) -> dict:
    """The dataset's classifier training settings, or a one-line error when it has none."""
    recipe = dataset.classifier_recipe()
    if recipe is None:
        raise UsageError(f"metric classifier_fd needs a dataset with a classifier recipe; dataset {dataset_name} "
                         f"has none (use fid, or fd_pixels)")
    return dict(recipe)


def recipe_for(dataset_name: str, settings: dict, images: torch.Tensor, labels: torch.Tensor) -> dict:
    """Everything that determines the trained weights; its hash names the file. ``settings``: the
    dataset's ``classifier_recipe()`` (``holdout`` there is the held-out fraction)."""
    settings = dict(settings)
    holdout = settings.pop("holdout", HOLDOUT_FRACTION)
    data = hashlib.sha256()
    data.update(images.contiguous().float().numpy().tobytes())
    data.update(labels.contiguous().long().numpy().tobytes())
    return {
        "format": _FORMAT, "version": VERSION, "architecture": ARCHITECTURE, "dataset": dataset_name,
        "shape": list(images.shape[1:]), "num_classes": int(labels.max()) + 1, "n_images": int(len(images)),
        "data_sha256": data.hexdigest()[:16], "holdout_fraction": holdout, "seed": SEED,
        "optimizer": "adam", **settings,
    }


def recipe_hash(recipe: dict) -> str:
    return hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:12]


def classifier_path(recipe: dict) -> Path:
    return cache_dir() / "classifiers" / f"classifier-{recipe['dataset']}-v{VERSION}-{recipe_hash(recipe)}.pt"


def train_classifier(images: torch.Tensor, labels: torch.Tensor, recipe: dict,
                     log: Optional[Callable[[str], None]] = None) -> tuple[SmallCNN, float]:
    """Train on all but a held-out ``HOLDOUT_FRACTION`` (chosen by the seed); return the model
    and its held-out accuracy. Deterministic: initial weights from ``torch.manual_seed(seed)``
    inside a forked RNG (the caller's random state is untouched), batches from a private
    generator, no dropout."""
    generator = torch.Generator().manual_seed(recipe["seed"])
    order = torch.randperm(len(images), generator=generator)
    held = max(1, int(len(images) * recipe["holdout_fraction"]))
    holdout, train_idx = order[:held], order[held:]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(recipe["seed"])
        model = SmallCNN(images.shape[1], recipe["num_classes"])
    optimizer = torch.optim.Adam(model.parameters(), lr=recipe["lr"])
    batch = recipe["batch_size"]
    model.train()
    for epoch in range(recipe["epochs"]):
        shuffled = train_idx[torch.randperm(len(train_idx), generator=generator)]
        total = 0.0
        for start in range(0, len(shuffled) - batch + 1, batch):
            index = shuffled[start : start + batch]
            loss = nn.functional.cross_entropy(model(images[index]), labels[index])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total += float(loss.detach())
        if log is not None and (epoch + 1 == recipe["epochs"] or (epoch + 1) % max(1, recipe["epochs"] // 5) == 0):
            log(f"classifier epoch {epoch + 1}/{recipe['epochs']}: loss {total / max(1, len(shuffled) // batch):.4f}")
    model.eval()
    with torch.no_grad():
        predictions = torch.cat([model(chunk).argmax(1) for chunk in images[holdout].split(1000)])
    accuracy = float((predictions == labels[holdout]).float().mean())
    return model, accuracy


def load_classifier(path: Path) -> Classifier:
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # truncated or foreign file
        raise UsageError(f"classifier {path} is unreadable ({type(exc).__name__}); delete it to train it again") from None
    recipe = payload["recipe"]
    model = SmallCNN(recipe["shape"][0], recipe["num_classes"])
    model.load_state_dict(payload["state_dict"])
    model.eval().requires_grad_(False)
    return Classifier(model, path, recipe, float(payload["holdout_accuracy"]))


def classifier_for(
    dataset: Any,
    dataset_name: str,
    *,
    images: Optional[torch.Tensor] = None,
    labels: Optional[torch.Tensor] = None,
    log: Callable[[str], None] = lambda line: print(line, file=sys.stderr),
) -> Classifier:
    """The cached classifier for this dataset's recipe, trained now (and cached) if there is none.
    ``dataset``: a ``distillkit.Dataset`` with ``classifier_recipe``; ``images`` / ``labels``: its
    labelled training data (``dataset.labelled_images()`` when not given)."""
    settings = dataset_recipe(dataset, dataset_name)
    if images is None or labels is None:
        images, labels = dataset.labelled_images()
        images, labels = images.float(), labels.long()
    recipe = recipe_for(dataset_name, settings, images, labels)
    path = classifier_path(recipe)
    if path.is_file():
        return load_classifier(path)
    log(f"distillkit: training the {dataset_name} classifier for classifier_fd once ({recipe['epochs']} epochs "
        f"on {len(images):,} images); cached as {path}")
    started = time.perf_counter()
    with torch.enable_grad():
        model, accuracy = train_classifier(images, labels, recipe, log=log)
    seconds = time.perf_counter() - started
    payload = {"format": _FORMAT, "recipe": recipe, "state_dict": model.state_dict(), "holdout_accuracy": accuracy}
    buffer = io.BytesIO()  # not torch.save(path): the zip's folder name would be the temporary file's name
    torch.save(payload, buffer)
    write_atomic(path, lambda tmp: tmp.write_bytes(buffer.getvalue()))
    sidecar = {"file": path.name, "recipe": recipe, "recipe_hash": recipe_hash(recipe),
               "holdout_accuracy": accuracy, "train_seconds": round(seconds, 2),
               "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
               "torch_version": torch.__version__}
    write_atomic(path.with_suffix(".json"), lambda tmp: tmp.write_text(json.dumps(sidecar, indent=2) + "\n"))
    log(f"distillkit: classifier trained in {seconds:.1f}s, held-out accuracy {accuracy:.3f}")
    model.requires_grad_(False)
    return Classifier(model, path, recipe, accuracy)


def classifier_fd(generated: torch.Tensor, reference_features: torch.Tensor, classifier: Classifier) -> float:
    """Fréchet distance between Gaussians fitted to the classifier features of generated images
    and of real images (``reference_features = classifier.features(real)``)."""
    from .metrics import frechet_distance

    return frechet_distance(classifier.features(generated), reference_features)


def accuracy_on(classifier: Classifier, images: torch.Tensor, labels: torch.Tensor) -> float:
    with torch.no_grad():
        predictions = torch.cat([classifier.model(chunk.clamp(-1, 1)).argmax(1) for chunk in images.split(1000)])
    return float((predictions == labels).float().mean())


__all__ = ["Classifier", "SmallCNN", "classifier_for", "classifier_fd", "dataset_recipe", "load_classifier", "recipe_for",
           "train_classifier"]
