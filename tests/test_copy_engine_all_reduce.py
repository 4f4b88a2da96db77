"""How the copy-engine all-reduce splits rows between two ranks, and its size threshold (the path
itself needs two GPUs: tests/device/test_symm_all_reduce.py and test_e2e_gpu.py)."""

import pytest

from albireo.distributed.copy_engine_all_reduce import above_bytes_from_env, split_rows


@pytest.mark.parametrize("rows", [16384, 1001, 2])
def test_the_two_ranks_own_every_row_once(rows):
    (own0, peer0), (own1, peer1) = split_rows(rows, 0), split_rows(rows, 1)
    assert own0 == peer1 and own1 == peer0
    assert own0[0] == 0 and own0[1] == own1[0] and own1[1] == rows


def test_rank_0_owns_the_smaller_half_of_odd_rows():
    assert split_rows(7, 0) == ((0, 3), (3, 7))
    assert split_rows(7, 1) == ((3, 7), (0, 3))


def test_threshold_comes_from_the_environment(monkeypatch):
    monkeypatch.setenv("ALBIREO_CE_ALL_REDUCE_ABOVE_BYTES", "0")
    assert above_bytes_from_env() == 0
    monkeypatch.delenv("ALBIREO_CE_ALL_REDUCE_ABOVE_BYTES")
    assert above_bytes_from_env() == 8 * 2**20


def test_a_threshold_that_is_not_a_number_names_the_variable(monkeypatch):
    monkeypatch.setenv("ALBIREO_CE_ALL_REDUCE_ABOVE_BYTES", "8MiB")
    with pytest.raises(ValueError, match=r"ALBIREO_CE_ALL_REDUCE_ABOVE_BYTES must be a whole number of bytes, got '8MiB'"):
        above_bytes_from_env()
