"""Suite-wide checks.

Physics: every program any test models obeys the floor. The modeled time of
a program is never below its roofline (``runtime.roofline``: its FLOPs at
peak, the bytes that must cross HBM over the HBM bandwidth), so that
``efficiency`` never exceeds one. Each ``ProgramCost`` built while a test
runs is checked as it is made; a violation fails that test.
"""

import dataclasses
import os

import pytest
from hypothesis import settings

from runtime import cost_model

# Property tests draw the same examples on every run, so the suite passes or
# fails the same way in CI; HYPOTHESIS_PROFILE=explore draws fresh ones.
settings.register_profile("deterministic", derandomize=True)
settings.register_profile("explore", derandomize=False)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "deterministic"))

# relative slack for float rounding in sums of many kernels
FLOOR_TOLERANCE = 1e-9


@dataclasses.dataclass(frozen=True)
class _CheckedProgramCost(cost_model.ProgramCost):
    def __post_init__(self):
        assert self.time_s >= self.roofline_time_s * (1 - FLOOR_TOLERANCE), (
            f"modeled {self.time_s:.6g} s is below the physical floor {self.roofline_time_s:.6g} s "
            f"on {self.chip} ({len(self.kernels)} kernels, floor bytes {self.min_hbm_bytes:.6g})")


@pytest.fixture(autouse=True)
def modeled_time_never_beats_the_floor(monkeypatch):
    monkeypatch.setattr(cost_model, "ProgramCost", _CheckedProgramCost)
    yield


# an estimate may hold constants and small buffers, never a parameter-sized one
SHAPES_ONLY_MAX_ARRAY_BYTES = 1 << 20


@pytest.fixture
def shapes_only(monkeypatch):
    """For estimates from shapes: the program is never run on the host, and no
    array over 1 MiB is left allocated by the time the test ends."""
    import jax

    from runtime import executor

    def refuse(self, *args, **kwargs):
        raise AssertionError(f"an estimate from shapes ran the program ({type(self).__name__})")

    for cls in (executor.GraphExecutor, executor.EagerExecutor):
        monkeypatch.setattr(cls, "__call__", refuse)
    before = {id(a) for a in jax.live_arrays()}
    yield
    new = [a for a in jax.live_arrays() if id(a) not in before and a.nbytes > SHAPES_ONLY_MAX_ARRAY_BYTES]
    assert not new, f"arrays allocated: {[(a.shape, a.dtype) for a in new]}"
