"""The row chunks of the copy-engine all-reduce's matmul and its size threshold (the path itself
needs two GPUs: tests/device/test_symm_all_reduce.py and test_e2e_gpu.py)."""

import pytest

from albireo.distributed.copy_engine_all_reduce import above_bytes_from_env, chunk_bounds


@pytest.mark.parametrize("rows", [16384, 1000, 37, 4])
def test_chunks_cover_every_row_once_in_order(rows):
    bounds = chunk_bounds(rows, 4)
    assert bounds[0] == 0 and bounds[-1] == rows and len(bounds) == 5
    assert all(lo <= hi for lo, hi in zip(bounds, bounds[1:]))


def test_each_chunk_is_half_the_one_before():
    bounds = chunk_bounds(15 * 1024, 4)
    assert [hi - lo for lo, hi in zip(bounds, bounds[1:])] == [8192, 4096, 2048, 1024]


def test_one_chunk_is_the_whole_matmul():
    assert chunk_bounds(300, 1) == [0, 300]


def test_threshold_comes_from_the_environment(monkeypatch):
    monkeypatch.setenv("ALBIREO_CE_ALL_REDUCE_ABOVE_BYTES", "0")
    assert above_bytes_from_env() == 0
    monkeypatch.delenv("ALBIREO_CE_ALL_REDUCE_ABOVE_BYTES")
    assert above_bytes_from_env() == 8 * 2**20


def test_a_threshold_that_is_not_a_number_names_the_variable(monkeypatch):
    monkeypatch.setenv("ALBIREO_CE_ALL_REDUCE_ABOVE_BYTES", "8MiB")
    with pytest.raises(ValueError, match=r"ALBIREO_CE_ALL_REDUCE_ABOVE_BYTES must be a whole number of bytes, got '8MiB'"):
        above_bytes_from_env()
