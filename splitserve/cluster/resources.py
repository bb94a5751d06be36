"""What a pool's workers ask Ray for: `--prefill-resources` / `--decode-resources` specs.

A spec is comma-separated KEY=VALUE items: `CPU` and `GPU` are Ray's own resources, `label:KEY` a node
label the worker's node must carry, anything else a custom resource, e.g.
`CPU=8,GPU=1,label:ray.io/accelerator-type=H100` or `CPU=4,decode_node=1`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

LABEL_PREFIX = "label:"


@dataclass(frozen=True)
class PoolResources:
    num_cpus: float = 1.0
    num_gpus: float = 0.0
    custom: dict[str, float] = field(default_factory=dict)
    labels: dict[str, str] = field(default_factory=dict)

    def actor_options(self) -> dict:
        """Keyword arguments for `ActorClass.options(...)`."""
        options: dict = {"num_cpus": self.num_cpus, "num_gpus": self.num_gpus, "resources": dict(self.custom)}
        if self.labels:
            options["label_selector"] = dict(self.labels)
        return options

    def threads(self) -> int:
        """torch threads for a worker: the CPUs Ray reserved for it, at least one."""
        return max(1, int(self.num_cpus))


def parse_resources(spec: str | None) -> PoolResources:
    """A spec as described above; None or "" is one CPU. Raises ValueError naming the bad item."""
    cpus, gpus = 1.0, 0.0
    custom: dict[str, float] = {}
    labels: dict[str, str] = {}
    for item in (spec or "").split(","):
        item = item.strip()
        if not item:
            continue
        key, sep, value = item.partition("=")
        key, value = key.strip(), value.strip()
        if not sep or not key or not value:
            raise ValueError(f"resource item {item!r} is not KEY=VALUE")
        if key.startswith(LABEL_PREFIX):
            labels[key[len(LABEL_PREFIX):]] = value
            continue
        try:
            amount = float(value)
        except ValueError:
            raise ValueError(f"resource {key!r}: {value!r} is not a number") from None
        if amount < 0:
            raise ValueError(f"resource {key!r}: {amount} is negative")
        if key.upper() == "CPU":
            cpus = amount
        elif key.upper() == "GPU":
            gpus = amount
        else:
            custom[key] = amount
    return PoolResources(cpus, gpus, custom, labels)
