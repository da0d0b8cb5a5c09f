"""`analyze(workers=N)`: worker processes measure the checkpoints into the cache; the report is unchanged."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from test_reliability_analyze import ONES, cache_entries, quiet_analyze, write_history

import revlens
import revlens.jobpool

from conftest import PROMPTS, shifted


@pytest.fixture()
def history(tiny_model, tmp_path):
    return write_history(
        tmp_path / "h",
        tiny_model,
        {
            "r0": {1: shifted(tiny_model, 1, -0.3 * ONES), 2: shifted(tiny_model, 1, 0.2 * ONES)},
            "r1": {1: shifted(tiny_model, 2, 0.5 * ONES), 2: shifted(tiny_model, 0, torch.linspace(-1, 1, 32))},
        },
    )


@pytest.mark.slow  # 7 s; JobPool's workers against one process: tests/test_jobpool.py
def test_workers_measure_into_the_cache_and_give_the_one_process_report(history, tmp_path, monkeypatch):
    monkeypatch.setattr(revlens.jobpool, "threads_per_worker", lambda workers, cores=None: 1)
    one, _ = quiet_analyze(str(history), PROMPTS, cache_dir=tmp_path / "c1")
    two, _ = quiet_analyze(str(history), PROMPTS, cache_dir=tmp_path / "c2", workers=2)
    assert set(cache_entries(tmp_path / "c2")) == set(cache_entries(tmp_path / "c1"))
    assert len(cache_entries(tmp_path / "c2")) == 6
    np.testing.assert_array_equal(two.alignment, one.alignment)
    np.testing.assert_array_equal(two.drift_norm, one.drift_norm)
    torch.testing.assert_close(two.v_rev, one.v_rev, rtol=0, atol=0, equal_nan=True)


def test_workers_need_a_cache_on_disk(history, tiny_model, tmp_path):
    with pytest.raises(ValueError, match="needs cache_dir"):
        revlens.analyze(str(history), PROMPTS, workers=2, progress=False)
    in_memory = {"pretrain": tiny_model, "align": tiny_model, "finetune": {"r": {1: tiny_model}}}
    with pytest.raises(ValueError, match="in-memory models"):
        revlens.analyze(in_memory, PROMPTS, workers=2, cache_dir=tmp_path / "c", progress=False)
    with pytest.raises(ValueError, match="whole number of processes"):
        revlens.analyze(str(history), PROMPTS, workers=0, progress=False)


def test_a_pickled_probe_is_still_unmeasured_and_measures_alike(tiny_model):
    """Workers receive the probe pickled: its "nothing read yet" state must survive the trip."""
    import pickle

    from revlens.probe import ReversionProbe

    probe = ReversionProbe(PROMPTS, layers=[0, 2])
    sent = pickle.loads(pickle.dumps(probe))
    assert sent.chat_template_used == probe.chat_template_used
    torch.testing.assert_close(sent.measure(tiny_model).centroid, probe.measure(tiny_model).centroid, rtol=0, atol=0)
