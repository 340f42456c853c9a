"""DLF does what its name says: at the default server settings the server's step moves the shared A by a
non-negligible, predictable amount, and switching it off ("w/o DLF") gives a different global model.

A's rows have norm C = √n, so its entries are O(1); an Adam step of server.lr would move them by ~0.1 %.
The server's step is sized like a client's step on a unit-norm B column (AFLoRA.server_lr_scale): each
step moves a row of A by ≈ server.lr·√m of its norm, so S steps move A by between server.lr·√m·√S (signs
that change every step) and server.lr·√m·S (signs that never change).
"""

from __future__ import annotations

import pytest

from aflora.config import ServerConfig
from aflora.runtime import ClientRuntime, ServerRuntime

from helpers import tiny_config

DEFAULT_SERVER = ServerConfig()


def frobenius(tensors) -> float:
    return sum(float(t.pow(2).sum()) for t in tensors) ** 0.5


def rounds_with_a(config):
    """Run the rounds engine-free; per round: A before the server step and the fused A' that was merged."""
    server, client = ServerRuntime(config), ClientRuntime(config)
    seen = []
    for round_ in range(1, config.rounds + 1):
        uploads = [client.train(instruction, sync) for instruction, sync in server.instructions(round_)]
        A_before = {name: A.clone() for name, A in server.method.A_global.items()}
        diagnostics = server.complete_round(round_, uploads)
        A_fused = {name: f.A for name, f in server.merges.by_round[round_].items()}
        seen.append((A_before, A_fused, diagnostics))
    return server, seen


def dlf_config(tmp_path, *overrides):
    return tiny_config(tmp_path, f"server.lr={DEFAULT_SERVER.lr}", f"server.steps={DEFAULT_SERVER.steps}",
                       f"server.batch_size={DEFAULT_SERVER.batch_size}", *overrides)


def test_server_step_moves_A_by_the_documented_amount(tmp_path):
    server, seen = rounds_with_a(dlf_config(tmp_path))
    shapes = server.method.module_shapes
    sqrt_m = (sum(m for m, _ in shapes.values()) / len(shapes)) ** 0.5
    low = DEFAULT_SERVER.lr * sqrt_m * DEFAULT_SERVER.steps**0.5
    high = DEFAULT_SERVER.lr * sqrt_m * DEFAULT_SERVER.steps
    alpha = server.method.options.alpha
    for A_before, A_fused, diagnostics in seen:
        fused_change = frobenius(A_fused[n] - A for n, A in A_before.items()) / frobenius(A_before.values())
        tuning_change = fused_change / (1 - alpha)  # Eq. 11: A' − A = (1 − α)(A_FT − A)
        assert 0.5 * low <= tuning_change <= 1.5 * high, (tuning_change, low, high)
        assert diagnostics["a_fused_change"] == pytest.approx(fused_change, rel=1e-4)
        assert diagnostics["a_tuning_change"] == pytest.approx(tuning_change, rel=1e-4)


def test_without_dlf_the_global_model_differs(tmp_path):
    with_dlf, _ = rounds_with_a(dlf_config(tmp_path / "on"))
    without, seen = rounds_with_a(dlf_config(tmp_path / "off", "aflora.server_tuning=false"))
    assert all("a_tuning_change" not in diagnostics for *_, diagnostics in seen)
    names = sorted(with_dlf.method.A_global)
    on = [with_dlf.side.host.base_weight(n) for n in names]
    off = [without.side.host.base_weight(n) for n in names]
    base = ServerRuntime(dlf_config(tmp_path / "base"))
    start = [base.side.host.base_weight(n) for n in names]
    update_off = frobenius(b - s for b, s in zip(off, start))
    assert update_off > 0
    # the two runs' global updates differ by a sizeable fraction of the update itself
    assert frobenius(a - b for a, b in zip(on, off)) / update_off > 0.05


def test_out_of_domain_public_set_trains_A_with_the_lm_loss(tmp_path, data_dir):
    config = dlf_config(tmp_path, 'data.public_dataset="dolly"', f'data.data_dir="{data_dir}"', "rounds=1")
    server, seen = rounds_with_a(config)
    public = server.workload
    assert public.public_bundle is not None and public.public_bundle.task.kind == "instruction"
    assert len(public.public_rows) == 8 and public.public_objective == "lm"
    # every client row stays with the clients: nothing of the task's pool is held out for the server
    assert sum(len(rows) for rows in public.client_rows) == len(public.bundle.train)
    assert all(any(label != -100 for label in example.lm_labels) for example in server.public_examples)
    assert seen[0][2]["a_tuning_change"] > 0.01


def test_a_classification_public_dataset_is_refused_before_any_work(tmp_path, data_dir):
    from aflora.data import DataError
    from aflora.runtime import prepare_workload

    config = dlf_config(tmp_path, 'data.public_dataset="financial_phrasebank"', f'data.data_dir="{data_dir}"')
    with pytest.raises(DataError, match="public_dataset.*instruction data"):
        prepare_workload(config)
