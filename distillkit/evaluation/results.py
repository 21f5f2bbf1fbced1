"""What an evaluation produces: values per metric per NFE, the protocol that says how they were
measured, and the signatures that say when two numbers are the same measurement.

Metric names in MLflow are ``<prefix>/<metric>/nfe<k>`` (MLflow refuses ``@`` in metric names).
The prefix is ``eval`` for the run's own sampler, grid and default EMA; otherwise it names what
differs: ``eval-heun/...`` (another integrator), ``eval-consistency/...`` (another sampler),
``eval-online/...``, ``eval-heun-edm-online/...``, so different protocols never overwrite each other.
"""

from __future__ import annotations

from typing import Optional

import attrs


def base_signature(*, n: int, seed: int, sampling: str, weights: str, step: int) -> str:
    """What every number of an evaluation shares: ``n=.. seed=.. sampler=<describe>/<grid>
    weights=.. step=..`` (``sampling``: ``SamplingChoice.describe()``)."""
    return f"n={n} seed={seed} sampler={sampling} weights={weights} step={step}"


def signed(base: str, metric_signature: str) -> str:
    return f"{base} {metric_signature}" if metric_signature else base


def measured_nfes(tag_value: Optional[str], signature: str) -> set[int]:
    """The NFEs a run's ``distillkit.<prefix>.<metric>`` tag says were measured with this signature."""
    if not signature or not tag_value or not tag_value.startswith(f"{signature} nfe="):
        return set()
    return {int(k) for k in tag_value[len(signature) + len(" nfe="):].split(",") if k.strip().isdigit()}


def signature_tags(prefix: str, signatures: dict, nfes, existing: Optional[dict] = None) -> dict[str, str]:
    """``distillkit.<prefix>.<metric>``: the metric's signature and the NFEs measured under it
    (merged with the NFEs an earlier measurement of the same signature logged)."""
    tags = {}
    for metric, signature in signatures.items():
        key = f"distillkit.{prefix}.{metric}"
        merged = set(nfes) | measured_nfes((existing or {}).get(key), signature)
        tags[key] = f"{signature} nfe={','.join(str(k) for k in sorted(merged))}"
    return tags


@attrs.frozen
class EvalResult:
    prefix: str
    values: dict  # metric result name -> {nfe: value}
    steps: dict  # nfe -> grid steps
    seconds: dict  # nfe -> seconds spent sampling
    protocol: dict
    signatures: dict  # metric result name -> signature string
    sampler: str = ""  # SamplingChoice.describe(): ``ode/euler/uniform``
    samples: dict = attrs.field(factory=dict, repr=False)  # nfe -> samples (CPU), when kept

    def metrics(self) -> dict[str, float]:
        return {f"{self.prefix}/{metric}/nfe{nfe}": value
                for metric, by_nfe in self.values.items() for nfe, value in by_nfe.items()}

    def tags(self, existing: Optional[dict] = None) -> dict[str, str]:
        return signature_tags(self.prefix, self.signatures, self.steps, existing)

    def protocol_artifacts(self) -> dict[str, str]:
        """metric -> artifact path of its protocol: one file per metric, so measuring another
        metric later never replaces the record of how this one was measured."""
        return {metric: f"eval/{self.prefix}-{metric}.json" for metric in self.values}

    def metric_protocol(self, metric: str) -> dict:
        """The protocol with only this metric's reference and results."""
        keys = {f"{self.prefix}/{metric}/nfe{k}" for k in self.steps}
        return {**self.protocol, "metrics": {metric: self.protocol["metrics"][metric]},
                "results": {k: v for k, v in self.protocol["results"].items() if k in keys}}

    def table(self) -> str:
        names = list(self.values)
        width = max([12, *(len(n) + 1 for n in names)])
        lines = [f"{'NFE':>5} {'steps':>6} " + " ".join(f"{n:>{width}}" for n in names) + f" {'seconds':>8}  sampler"]
        for nfe, steps in self.steps.items():
            cells = " ".join(f"{self.values[n][nfe]:>{width}.4f}" for n in names)
            lines.append(f"{nfe:>5} {steps:>6} {cells} {self.seconds[nfe]:>8.2f}  {self.sampler}")
        return "\n".join(lines)
