"""runtime/gc_pause.py: automatic collection is off inside a compile and
back on after it, whatever happens; never turned on if the user had it off."""

import gc

import jax.numpy as jnp
import pytest

import mtia_jax
from runtime.gc_pause import paused_gc, without_gc_pauses


@pytest.fixture
def gc_state():
    was = gc.isenabled()
    yield
    (gc.enable if was else gc.disable)()


def test_collection_is_off_inside_and_restored_after_even_on_error(gc_state):
    gc.enable()
    with paused_gc():
        assert not gc.isenabled()
        with paused_gc():  # nested: stays off, and the outer block turns it back on
            assert not gc.isenabled()
        assert not gc.isenabled()
    assert gc.isenabled()

    @without_gc_pauses
    def fails():
        assert not gc.isenabled()
        raise ValueError("inside")

    with pytest.raises(ValueError, match="inside"):
        fails()
    assert gc.isenabled()


def test_a_user_who_turned_collection_off_keeps_it_off(gc_state):
    gc.disable()
    with paused_gc():
        pass
    assert not gc.isenabled()


def test_compiling_and_calling_leave_collection_as_it_was(gc_state):
    seen = []

    def f(x):
        seen.append(gc.isenabled())  # traced inside the compile
        return x * 2

    gc.enable()
    out = mtia_jax.jit(f)(jnp.arange(3.0))
    assert seen == [False] and gc.isenabled()
    assert out.tolist() == [0.0, 2.0, 4.0]
