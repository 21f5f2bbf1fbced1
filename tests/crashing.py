"""What the exact-resume tests share: a crash at a chosen training step
(``train(..., on_step=crash_at(6))`` raises ``Crash`` right after step 6, and its checkpoint if one
is due, has completed) and ``assert_same``, bitwise equality of two checkpoint payloads that names
the first place they differ."""

import torch


class Crash(Exception):
    pass


def crash_at(step: int):
    def hook(done: int) -> None:
        if done == step:
            raise Crash(done)

    return hook


def assert_same(a, b, where="state"):
    if isinstance(a, dict):
        assert a.keys() == b.keys(), f"{where}: keys differ"
        for key in a:
            assert_same(a[key], b[key], f"{where}.{key}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{where}[{i}]")
    elif isinstance(a, torch.Tensor):
        assert torch.equal(a, b), f"{where} differs"
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"
