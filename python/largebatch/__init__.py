"""largebatch: layer-wise adaptive optimizers (LARS, LAMB, TVLARS and the peers' variants) on a C++ engine.

    import largebatch
    opt = largebatch.optim.make("tvlars", model.named_parameters(), lr=1.0)

`largebatch.optim` holds the optimizers; `phi` and `LrSchedule` are the TVLARS factor and the learning-rate
schedules of the C++ library (docs/PYTHON.md).
"""
from . import optim
from ._largebatch import LrSchedule, fused_step_instruction_set, presets

__all__ = ["optim", "phi", "LrSchedule", "presets", "fused_step_instruction_set"]


def phi(t, alpha=1.0, lambda_=1e-3, delay=0.0, gamma_min=0.0, **kwargs):
    """TVLARS's factor phi_t = 1 / (alpha + exp(lambda (t - delay))) + gamma_min at 0-based step t.

    `lambda` is a Python keyword: give it as lambda_=..., or as **{"lambda": ...}.
    """
    if "lambda" in kwargs:
        lambda_ = kwargs.pop("lambda")
    if kwargs:
        raise TypeError("phi() got unexpected keyword arguments: " + ", ".join(sorted(kwargs)))
    return optim._engine.phi(int(t), float(alpha), float(lambda_), float(delay), float(gamma_min))
