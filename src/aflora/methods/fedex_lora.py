"""FedEx-LoRA (Singhal et al., ACL 2025): FedIT's averages of A and B, made exact by merging their error into
the frozen base.

Clients train one LoRA of one rank from the global (Ā, B̄) and upload A and B, as in FedIT. The server keeps
Ā = Σ p_k A_k and B̄ = Σ p_k B_k as the next global adapter and merges the residual

    R = Σ_k p_k B_k A_k − B̄ Ā                                  (what FedIT's Eq. 5 error leaves out)

into every base model, so base + R + B̄Ā = base + Σ_k p_k B_k A_k exactly. The reference
(RaghavSinghal10/fedex-lora, fed_agg.py, aggregate_models_ours) forms R as a dense m × n matrix and adds
R·scaling to `base_layer.weight`. Here R travels as exact stacked factors,

    R = [p_1 B_1 … p_K B_K, −B̄] · [A_1; …; A_K; Ā]               (rank (K+1)·r)

so it goes through `round_merge` like FLoRA's update; the factors are scale-free (the host folds LoRA's scaling
in), which is the reference's `residue * scaling_factor`. Uplink is A and B only; the downlink adds a full-size
(m × n) update per module per round, merged into the base.

Choices: the reference averages uniformly (`.mean(0)`, its clients hold equal shares); we use p_k = |D_k|/Σ|D|
like every method here, which is the same on equal partitions. Scaling follows its GLUE script
(fed_train_glue.py: `--lora_r 4`, `--lora_alpha 8`, one alpha for the run): `fixed`, lora_alpha 8, so 8/r.

`aggregation_error` measures B̄Ā + R (exact, ~1e-7); `residual_norm` reports ‖R‖_F / ‖Σ p_k B_k A_k‖_F over all
modules, which is FedIT's aggregation error on the same uploads: how much FedEx corrects.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..lora.factors import Adapter, ModuleFactors, stack_adapters
from .aggregation import LORA_ALPHA_HELP, ProductError, data_weights, relative_error
from .base import Upload, tensor_key
from .shared_lora import FedIT, SharedLoRAOptions


@dataclass
class FedExLoRAOptions(SharedLoRAOptions):
    """fedex-lora fed_train_glue.py: LoraConfig(r=args.lora_r, lora_alpha=args.lora_alpha), defaults 4 and 8."""

    lora_alpha: float = field(default=8.0, metadata=LORA_ALPHA_HELP)


class FedExLoRA(FedIT):
    name = "fedex_lora"
    summary = "FedEx-LoRA (Singhal et al. 2025): FedIT's averages, made exact by merging their error into the base"
    options_class = FedExLoRAOptions
    exact_aggregation = True  # B̄Ā plus the residual merged into the base is Σ p_k B_k A_k

    def init_server_state(self) -> None:
        super().init_server_state()
        self._residual: Adapter | None = None
        self._residual_norm: float | None = None

    def aggregate(self, uploads: list[Upload], round_: int) -> None:
        super().aggregate(uploads, round_)  # FedIT: Ā, B̄, and the error terms of B̄Ā against Σ p_k B_k A_k
        self._residual_norm = relative_error(self._error_terms or [])  # ‖R‖ / ‖Σ p_k B_k A_k‖: R is exactly that error
        uploads = sorted(uploads, key=lambda u: u.client_id)
        weights = data_weights([u.num_examples for u in uploads])
        client_factors = [{name: ModuleFactors(A=u.tensors[tensor_key("A", name)], B=u.tensors[tensor_key("B", name)])
                           for name in self.global_factors} for u in uploads]
        # R = [p_1B_1 … p_KB_K, −B̄]·[A_1; …; A_K; Ā]: exact, no m × n product
        weighted = [{name: ModuleFactors(A=f.A, B=float(p) * f.B) for name, f in c.items()} for p, c in zip(weights, client_factors)]
        negated_mean = {name: ModuleFactors(A=f.A, B=-f.B) for name, f in self.global_factors.items()}
        self._residual = stack_adapters(weighted + [negated_mean])
        corrected = stack_adapters([self.global_factors, self._residual])  # what clients hold: B̄Ā over base + R
        self._error_terms = [ProductError(corrected[name].B, corrected[name].A, [(float(p), c[name].B, c[name].A)
                                                                               for p, c in zip(weights, client_factors)])
                             for name in sorted(self.global_factors)]

    def round_merge(self) -> Adapter | None:
        return self._residual

    def round_diagnostics(self) -> dict[str, float]:
        return {} if self._residual_norm is None else {"residual_norm": self._residual_norm}
