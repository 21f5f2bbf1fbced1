"""``cifar10``: the 50,000 CIFAR-10 training images (3x32x32), from the python pickle batches.

Files: ``data_batch_1`` .. ``data_batch_5`` and ``batches.meta`` (``cifar-10-python.tar.gz``,
extracted), in ``DIR/cifar-10-batches-py/`` (torchvision's layout, what ``download = true``
leaves) or directly in ``DIR``. ``test_batch`` is not needed.

The batches are pickles, and unpickling runs whatever a file asks for, so every file is checked
before anything is unpickled:

1. its size: with ``verify_checksums`` (the default) it must be exactly the size of the real
   file; without, it must stay under a cap (32 MiB per batch, 64 KiB for ``batches.meta``);
2. its MD5 against torchvision's ``CIFAR10`` class attributes (``verify_checksums`` only);
3. its format: the pickle's opcode stream (read with ``pickletools``, nothing executed) may only
   import numpy's array reconstruction helpers.

Then torchvision's ``CIFAR10`` reads them, and the arrays are checked (``[N, 32, 32, 3]`` uint8,
``N`` labels in 0..9). Every failure is a one-line ``UsageError`` naming the file.
``verify_checksums = false`` exists for files written by tests or converted by the user.
"""

from __future__ import annotations

import io
import pickletools
from pathlib import Path
from typing import Optional

import attrs
import numpy as np
import torch
import torchvision.datasets as tv_datasets
from torchvision.datasets.utils import calculate_md5

from .images import ArrayImageDataset, boolean, data_error, first_line

BASE_FOLDER = tv_datasets.CIFAR10.base_folder  # "cifar-10-batches-py"
TRAIN_FILES = tuple(name for name, _ in tv_datasets.CIFAR10.train_list)
META_FILE = tv_datasets.CIFAR10.meta["filename"]
REQUIRED_FILES = (*TRAIN_FILES, META_FILE)

#: name -> (size in bytes, md5) of the real files. MD5s from torchvision's class attributes;
#: sizes of the files inside cifar-10-python.tar.gz (tests replace this table).
EXPECTED_FILES: dict[str, tuple[int, str]] = {
    **dict(
        zip(
            TRAIN_FILES,
            zip((31035704, 31035320, 31035999, 31035696, 31035623), (md5 for _, md5 in tv_datasets.CIFAR10.train_list)),
        )
    ),
    META_FILE: (158, tv_datasets.CIFAR10.meta["md5"]),
}

#: without ``verify_checksums``: the largest file accepted (a batch holds at most 10,000 images;
#: the cap leaves room for a batch re-pickled with another protocol).
MAX_UNCHECKED_SIZE: dict[str, int] = {**{name: 32 * 2**20 for name in TRAIN_FILES}, META_FILE: 64 * 2**10}

#: the only globals a CIFAR-10 pickle may import (numpy arrays, and bytes in protocol 2).
ALLOWED_GLOBALS = frozenset(
    {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.numeric", "_frombuffer"),
        ("numpy._core.numeric", "_frombuffer"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("_codecs", "encode"),
    }
)
_STRING_OPCODES = {"SHORT_BINUNICODE", "BINUNICODE", "BINUNICODE8", "UNICODE", "SHORT_BINSTRING", "BINSTRING", "STRING"}
_MEMO_PUT_OPCODES = {"MEMOIZE", "PUT", "BINPUT", "LONG_BINPUT"}
_MEMO_GET_OPCODES = {"GET", "BINGET", "LONG_BINGET"}
_FRAMING_OPCODES = {"PROTO", "FRAME"}
_REFUSED_OPCODES = {"EXT1", "EXT2", "EXT4", "PERSID", "BINPERSID", "INST", "OBJ"}


def pickle_imports_problem(data: bytes) -> Optional[str]:
    """Why this pickle is not a plain CIFAR-10 batch, or None.

    Reads the opcodes with ``pickletools`` without executing anything: every ``GLOBAL`` and
    ``STACK_GLOBAL`` must name an allowed global. ``STACK_GLOBAL`` (protocol 4+) takes its
    module and name from the two values pushed before it, which are strings pushed there or
    fetched from the memo; both are tracked, and anything else is refused.
    """
    memo: dict[int, Optional[str]] = {}
    recent: list[Optional[str]] = []  # the last two values pushed (None: not a string)
    try:
        for opcode, arg, _ in pickletools.genops(io.BytesIO(data)):
            name = opcode.name
            if name in _FRAMING_OPCODES:
                continue
            if name in _MEMO_PUT_OPCODES:
                memo[len(memo) if name == "MEMOIZE" else int(arg)] = recent[-1] if recent else None
                continue
            if name in _REFUSED_OPCODES:
                return f"uses the pickle opcode {name}"
            if name in _MEMO_GET_OPCODES:
                pushed = memo.get(int(arg))
            elif name in _STRING_OPCODES:
                pushed = arg if isinstance(arg, str) else None
            else:
                if name == "GLOBAL":
                    module, _, attribute = str(arg).partition(" ")
                    if (module, attribute) not in ALLOWED_GLOBALS:
                        return f"imports {module}.{attribute}"
                elif name == "STACK_GLOBAL":
                    pair = tuple(recent[-2:])
                    if len(pair) < 2 or None in pair:
                        return "imports a global it does not name plainly"
                    if pair not in ALLOWED_GLOBALS:
                        return f"imports {pair[0]}.{pair[1]}"
                pushed = None
            recent = (recent + [pushed])[-2:]
    except Exception as exc:  # truncated or not a pickle at all
        return f"is not a valid pickle ({first_line(exc)})"
    return None


@attrs.frozen
class CIFAR10Config:
    """Options of the ``cifar10`` dataset."""

    #: train with labels (num_classes = 10); items become (image, label) pairs
    class_conditional: bool = attrs.field(default=False, validator=boolean)
    #: random horizontal flip of training images (on in the CUD / EDM / CM recipes)
    hflip: bool = attrs.field(default=True, validator=boolean)
    #: let torchvision download and extract cifar-10-python.tar.gz into --data-root when missing
    download: bool = attrs.field(default=False, validator=boolean)
    #: require the exact size and MD5 of the real files (false: size cap and format check only)
    verify_checksums: bool = attrs.field(default=True, validator=boolean)


class Cifar10(ArrayImageDataset):
    name = "cifar10"
    config_class = CIFAR10Config
    default_backbone = "songunet"
    shape = (3, 32, 32)
    num_classes = 10

    def __init__(self, config: Optional[CIFAR10Config] = None, data_root: Optional[str] = None):
        super().__init__(config if config is not None else CIFAR10Config(), data_root)

    def find(self) -> Optional[Path]:
        if self.root is None:
            return None
        for folder in (self.root / BASE_FOLDER, self.root):
            if all((folder / name).is_file() for name in REQUIRED_FILES):
                return folder
        return None

    def missing_error(self):
        files = "data_batch_1 .. data_batch_5 and batches.meta (cifar-10-python.tar.gz from https://www.cs.toronto.edu/~kriz/cifar.html, extracted)"
        if self.root is None:
            return data_error(
                self.name,
                f"no --data-root given: pass --data-root DIR with {files} in DIR/{BASE_FOLDER}/, or add "
                f"--set dataset_options.download=true to let torchvision download them into DIR",
            )
        return data_error(
            self.name,
            f"training files not found: put {files} in {self.root / BASE_FOLDER}/, "
            f"or set dataset_options.download=true to let torchvision download them there",
        )

    def download(self) -> None:
        if self.root is None:
            raise data_error(self.name, "dataset_options.download=true needs --data-root DIR to download into")
        try:
            tv_datasets.CIFAR10(root=str(self.root), train=True, download=True)
        except Exception as exc:
            raise data_error(
                self.name,
                f"downloading into {self.root} failed ({first_line(exc)}); put the extracted batches in "
                f"{self.root / BASE_FOLDER}/ by hand",
            ) from None

    def check_file(self, path: Path) -> None:
        """Size, MD5 (if verifying) and pickle format, before anything is unpickled."""
        expected_size, expected_md5 = EXPECTED_FILES[path.name]
        size = path.stat().st_size
        if self.config.verify_checksums:
            if size != expected_size:
                raise data_error(
                    self.name, f"{path} is {size:,} bytes; the real file is {expected_size:,} (truncated or not CIFAR-10)"
                )
            if calculate_md5(path) != expected_md5:
                raise data_error(self.name, f"{path} has the right size but not the MD5 of the real file (corrupted)")
        elif size > MAX_UNCHECKED_SIZE[path.name]:
            raise data_error(
                self.name, f"{path} is {size:,} bytes, more than a CIFAR-10 {path.name} can hold ({MAX_UNCHECKED_SIZE[path.name]:,})"
            )
        problem = pickle_imports_problem(path.read_bytes())
        if problem is not None:
            raise data_error(self.name, f"{path} {problem}; refusing to unpickle it")

    def load(self) -> tuple[torch.Tensor, torch.Tensor]:
        folder = self.find()
        if folder is None and self.config.download:
            self.download()
            folder = self.find()
        if folder is None:
            raise self.missing_error()
        for name in REQUIRED_FILES:
            self.check_file(folder / name)

        # torchvision reads the batches; the files were checked above, so it is not asked to
        # hash them again, and test_batch (which training never reads) is not required.
        reader = type(
            "CheckedCIFAR10",
            (tv_datasets.CIFAR10,),
            {
                "base_folder": folder.name,
                "train_list": [[name, None] for name in TRAIN_FILES],
                "test_list": [],
                "meta": {**tv_datasets.CIFAR10.meta, "md5": None},
            },
        )
        try:
            cifar = reader(root=str(folder.parent), train=True, download=False)
            data, targets = np.asarray(cifar.data), np.asarray(cifar.targets)
        except Exception as exc:
            raise data_error(self.name, f"the batches in {folder} could not be read ({first_line(exc)})") from None
        if data.dtype != np.uint8 or data.ndim != 4 or data.shape[1:] != (32, 32, 3):
            raise data_error(self.name, f"the batches in {folder} hold {data.dtype} images of shape {data.shape[1:]}")
        images = torch.from_numpy(data).permute(0, 3, 1, 2).contiguous()
        return images, torch.from_numpy(targets.astype(np.int64))
