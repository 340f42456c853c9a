"""Client-level DP: clipping, uniform weights, the noise's scale, ε accounting, and config guards."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch

from aflora.config import ConfigError, load_config
from aflora.privacy import PrivacyLedger, clip_upload, noise_std, upload_norm
from aflora.results import round_record
from aflora.runtime import ClientRuntime, ServerRuntime

from helpers import tiny_config


def test_clipping_bounds_the_joint_norm_and_skips_masks_and_eval_tensors():
    tensors = {"B/a": torch.full((3, 4), 2.0), "B/b": torch.full((2,), 3.0), "next_mask/a": torch.ones(4, dtype=torch.bool),
               "eval/B/a": torch.full((5,), 100.0)}
    expected = math.sqrt(12 * 4.0 + 2 * 9.0)
    assert upload_norm(tensors) == pytest.approx(expected)
    assert clip_upload(tensors, 1.5) == pytest.approx(expected)
    assert upload_norm(tensors) == pytest.approx(1.5)
    assert torch.equal(tensors["eval/B/a"], torch.full((5,), 100.0)) and tensors["next_mask/a"].dtype == torch.bool
    before = {k: v.clone() for k, v in tensors.items()}
    clip_upload(tensors, 10.0)  # already within the bound: unchanged
    assert all(torch.equal(before[k], tensors[k]) for k in tensors)


@pytest.fixture
def dp_round(tmp_path):
    config = tiny_config(tmp_path, "privacy.clip_norm=0.5", "privacy.noise_multiplier=2.0")
    server, client = ServerRuntime(config), ClientRuntime(config)
    uploads = [client.train(i, s) for i, s in server.instructions(1)]
    return config, server, uploads


def test_clients_clip_and_the_server_adds_noise_of_scale_sigma_c_over_m(dp_round, tmp_path):
    config, server, uploads = dp_round
    assert all(upload_norm(u.tensors) <= 0.5 + 1e-5 for u in uploads)
    assert all(u.metrics["update_norm"] > 0 for u in uploads)
    accepted = server.accept(1, uploads, [])
    # the same round without noise: the difference is the noise alone
    quiet = ServerRuntime(tiny_config(tmp_path / "quiet", "privacy.clip_norm=0.5", "privacy.noise_multiplier=0.0"))
    list(quiet.instructions(1))  # sent: the replies are checked against it
    quiet.complete_round(1, quiet.accept(1, uploads, []))
    noisy = server.method
    assert noisy.uniform_weights
    diagnostics = server.complete_round(1, accepted)
    noise = torch.cat([(noisy.B_global[n] - quiet.method.B_global[n]).flatten() for n in noisy.B_global])
    expected = 2.0 * 0.5 / 3
    assert diagnostics["dp_noise_std"] == pytest.approx(expected)
    assert noise.std().item() == pytest.approx(expected, rel=0.05)  # thousands of entries: a tight estimate
    assert abs(noise.mean().item()) < 0.05 * expected
    assert math.isfinite(diagnostics["dp_epsilon"]) and diagnostics["dp_epsilon"] > 0


def test_uniform_weights_replace_rank_aware_ones_under_dp(dp_round):
    _, server, uploads = dp_round
    assert server.method.uniform_weights  # set by the server runtime from privacy.clip_norm
    server.complete_round(1, server.accept(1, uploads, []))
    name = next(iter(server.method.module_shapes))
    # the noise-free part of B_global is the plain mean of the padded uploads
    from aflora.methods.aggregation import pad_columns
    from aflora.methods.base import tensor_key
    mean = sum(pad_columns(u.tensors[tensor_key("B", name)], server.sent[u.client_id].tensors[tensor_key("mask", name)], 8)
               for u in uploads) / 3
    residual = server.method.B_global[name] - mean
    assert residual.std().item() == pytest.approx(noise_std(2.0, 0.5, 3), rel=0.2)


def test_the_server_clips_an_upload_that_was_not_clipped(dp_round):
    _, server, uploads = dp_round
    key = next(k for k in uploads[0].tensors if k.startswith("B/"))
    uploads[0].tensors[key] = uploads[0].tensors[key] * 1000
    server.accept(1, uploads, [])
    assert upload_norm(uploads[0].tensors) == pytest.approx(0.5, rel=1e-5)


def test_epsilon_grows_with_rounds_shrinks_with_noise_and_replays():
    ledger = PrivacyLedger(noise_multiplier=1.0, delta=1e-5, population=10, sampled=False)
    eps = [ledger.release(10) for _ in range(3)]
    assert eps[0] < eps[1] < eps[2]
    louder = PrivacyLedger(noise_multiplier=4.0, delta=1e-5, population=10, sampled=False)
    assert louder.release(10) < eps[0]
    replayed = PrivacyLedger(noise_multiplier=1.0, delta=1e-5, population=10, sampled=False)
    replayed.replay(ledger.releases)
    assert replayed.accountant.get_epsilon(1e-5) == pytest.approx(eps[-1])
    assert PrivacyLedger(noise_multiplier=0.0, delta=1e-5, population=10, sampled=False).release(10) == math.inf


def test_dp_is_refused_for_methods_whose_aggregate_it_cannot_bound():
    with pytest.raises(ConfigError, match="privacy.clip_norm > 0 needs"):
        load_config(None, ["method=fedit", "privacy.clip_norm=1.0"])
    with pytest.raises(ConfigError, match="privacy.delta"):
        load_config(None, ["privacy.delta=2"])


def test_results_record_each_clients_norm_before_clipping(dp_round):
    """The number a user picks privacy.clip_norm from: in results.json per client, consistent with the clipping."""
    _, _, uploads = dp_round
    record = round_record(1, uploads, {"accuracy": 0.5, "loss": 1.0}, round_seconds=1.0, eval_seconds=1.0)
    assert record.update_norm == {str(u.client_id): u.metrics["update_norm"] for u in uploads}
    for upload in uploads:
        assert upload_norm(upload.tensors) == pytest.approx(min(upload.metrics["update_norm"], 0.5), rel=1e-5)
    plain = round_record(1, [replace(u, metrics={}) for u in uploads], {"loss": 1.0}, round_seconds=1.0, eval_seconds=1.0)
    assert plain.update_norm == {}
