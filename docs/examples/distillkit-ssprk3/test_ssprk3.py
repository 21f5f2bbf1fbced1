"""The plugin's own tests: distillkit's contract for tableaus, reused as it is."""

from distillkit.testing.integrators import TableauContract
from distillkit_ssprk3 import SSPRK3


class TestSSPRK3(TableauContract):
    tableau = SSPRK3
