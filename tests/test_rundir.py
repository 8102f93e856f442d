"""A run directory's files: checkpoints written over an old checkpoint's storage read back exactly."""

from __future__ import annotations

import io

import numpy as np

from ggml_probe.pipeline.rundir import save_npz


def test_a_file_written_over_an_old_one_reads_back_exactly(tmp_path):
    rng = np.random.default_rng(0)
    new = {"c": rng.normal(size=(64, 64)), "count": np.asarray(7), "meta": np.asarray('{"format": 1}')}
    plain = io.BytesIO()
    np.savez(plain, **new)  # NumPy's own bytes for these arrays, written to no file
    for old_size in (1 << 20, 100):  # an old file larger than the new one, and smaller
        old = tmp_path / f"old-{old_size}.npz"
        old.write_bytes(rng.bytes(old_size))
        target = tmp_path / f"new-{old_size}.npz"
        save_npz(target, reuse=old, **new)
        assert not old.exists()
        # nothing of the old file is left after the zip's end (the bytes differ only in the zip's timestamps)
        assert target.stat().st_size == len(plain.getvalue())
        with np.load(target) as z:
            assert set(z.files) == set(new)
            for k, v in new.items():
                np.testing.assert_array_equal(z[k], v)
    # the file to reuse is already gone (another writer removed it): a fresh file
    save_npz(tmp_path / "fresh.npz", reuse=tmp_path / "missing.npz", **new)
    assert (tmp_path / "fresh.npz").stat().st_size == len(plain.getvalue())
    with np.load(tmp_path / "fresh.npz") as z:
        np.testing.assert_array_equal(z["c"], new["c"])
