"""A crash at a chosen training step, for the exact-resume tests: ``train(..., on_step=crash_at(6))``
raises ``Crash`` right after step 6 (and its checkpoint, if one is due) has completed."""


class Crash(Exception):
    pass


def crash_at(step: int):
    def hook(done: int) -> None:
        if done == step:
            raise Crash(done)

    return hook
