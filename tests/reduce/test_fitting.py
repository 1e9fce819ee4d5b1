"""Fitting reducers on an in-memory sample: incremental PCA against exact PCA, an autoencoder against PCA on a curve
(and its files round-trip)."""

import numpy as np

from pipeline.core.config import ReduceConfig
from pipeline.reduce import fitting
from pipeline.reduce.fitting import fit_on_sample, fit_pca_on_sample
from pipeline.reduce.reducers import AUTOENCODER_FILE, REDUCER_ARRAYS, REDUCER_JSON, AutoencoderReducer, load_reducer


def test_incremental_pca_agrees_with_exact_pca(monkeypatch):
    rng = np.random.default_rng(0)
    basis, _ = np.linalg.qr(rng.normal(size=(12, 12)))
    x = ((rng.normal(size=(3000, 12)) * [6, 4, 2.5, 1, 1, 1, 1, 1, 1, 1, 1, 1]) @ basis.T + 10).astype(np.float32)
    exact = fit_pca_on_sample(x, ReduceConfig(components=3))
    monkeypatch.setattr(fitting, "IPCA_BATCH_BYTES", 8 * 12 * 400)  # 400-row batches
    inc = fit_pca_on_sample(x, ReduceConfig(components=3, incremental_above_mb=0.01))
    assert exact.fit_info["solver"].startswith("PCA") and inc.fit_info["solver"].startswith("IncrementalPCA")
    np.testing.assert_allclose(inc.components_matrix, exact.components_matrix, atol=2e-3)
    assert np.abs(inc.transform(x) - exact.transform(x)).max() < 0.01


def test_autoencoder_reconstructs_a_curve_better_than_one_pca_component(tmp_path):
    rng = np.random.default_rng(0)
    embed, _ = np.linalg.qr(rng.normal(size=(8, 3)))

    def curve(n):  # points on a bent 1-D curve in 8-D, a little noise
        t = rng.uniform(-1, 1, n)
        return (np.c_[t, t ** 2, np.sin(np.pi * t)] @ embed.T + rng.normal(0, 0.01, (n, 8))).astype(np.float32)

    train, test = curve(1500), curve(500)
    cfg = ReduceConfig(method="autoencoder", components=1, ae_hidden_units=32, ae_epochs=100, ae_batch_size=128,
                       ae_learning_rate=1e-2, ae_patience=10)
    ae = fit_on_sample(train, cfg)
    pca = fit_on_sample(train, ReduceConfig(method="pca", components=1))
    ae_err = np.mean((ae.reconstruct(test) - test) ** 2)
    pca_err = np.mean((pca.reconstruct(test) - test) ** 2)
    assert ae_err < 0.5 * pca_err, (ae_err, pca_err)
    assert ae.fit_info["training"]["epochs_run"] <= 100

    ae.save(tmp_path / "ae")
    assert {p.name for p in (tmp_path / "ae").iterdir()} == {REDUCER_JSON, REDUCER_ARRAYS, AUTOENCODER_FILE}
    loaded = load_reducer(tmp_path / "ae")
    assert isinstance(loaded, AutoencoderReducer) and loaded.hash == ae.hash
    np.testing.assert_array_equal(loaded.transform(test), ae.transform(test))
