"""The accelerator types Ray Serve LLM takes, held once.

A vllm variant's ``llm.acceleratorType`` becomes its ``LLMConfig.accelerator_type``, which
Ray Serve LLM checks against Ray's own list (``ray.util.accelerators.accelerators``) only
when the application is deployed: a name it does not know (``A100-80GB``, as nvidia-smi
spells the card, for Ray's ``A100-80G``) was stored, placed on a site whose GPUs carry the
same name, and failed there, far from the manifest that said it. The manifest holds Ray's
list so that apply refuses such a name, saying which one Ray spells like it. Ray's TPUs
are left out: edgeplane gives a replica's engine workers GPU bundles, which Ray Serve LLM
refuses for a TPU type ("Hardware mismatch").
``tests/ray/test_llm_serve.py`` checks this list against the installed Ray's.
"""

from __future__ import annotations

import difflib

#: ``ray.util.accelerators.accelerators`` of Ray 2.60 but its TPUs, and ``A10``, which Ray reads as ``A10G``.
RAY_ACCELERATOR_TYPES = (
    "A10", "A10G", "A100", "A100-40G", "A100-80G", "B200", "B300", "GB200", "GB300", "H100", "H20", "H200", "K80", "L4",
    "L40S", "P100", "P4", "RTX-PRO-6000", "T4", "V100",
    "AMD-Instinct-MI100", "AMD-Instinct-MI210", "AMD-Instinct-MI250X", "AMD-Instinct-MI250X-MI250", "AMD-Instinct-MI300A",
    "AMD-Instinct-MI300X-HF", "AMD-Instinct-MI300X-OAM", "AMD-Instinct-MI308X", "AMD-Instinct-MI325X-OAM",
    "AMD-Instinct-MI350X-OAM", "AMD-Instinct-MI355X-OAM", "AMD-Radeon-HD-7900", "AMD-Radeon-R9-200-HD-7900",
    "Intel-GAUDI", "Intel-GPU-Max-1100", "Intel-GPU-Max-1550",
    "Apple-Silicon", "M1", "M1-Max", "M1-Pro", "M1-Ultra", "M2", "M2-Max", "M2-Pro", "M2-Ultra", "M3", "M3-Max", "M3-Pro",
    "Ascend910B", "Ascend910B4", "FURIOSA_RNGD", "MOBILINT_ARIES", "MOBILINT_REGULUS", "MXC500", "MXC550", "aws-neuron-core",
)


def problem(name: str) -> str | None:
    """Why Ray Serve LLM refuses ``name`` as an accelerator type; None when it takes it."""
    if name in RAY_ACCELERATOR_TYPES:
        return None
    if name.upper().startswith("TPU"):
        return f"{name!r} is a TPU: edgeplane runs vllm replicas on GPUs"
    near = difflib.get_close_matches(name, RAY_ACCELERATOR_TYPES, n=1, cutoff=0.6)
    hint = f"did you mean {near[0]!r}?" if near else "Ray names NVIDIA cards H100, H200, A100-80G, L40S, L4..."
    return (f"{name!r} is not an accelerator type Ray Serve LLM takes; {hint} "
            "(leave acceleratorType out to run on any GPU model)")
