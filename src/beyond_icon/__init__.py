"""beyond-icon: the I-Con loss ``mean_i D(p(.|i) || q(.|i))`` with any divergence D."""

from beyond_icon import divergences, kernels, methods
from beyond_icon._validation import value_checks
from beyond_icon.divergences import InfiniteDivergenceError
from beyond_icon.loss import LossStats, icon_loss, icon_loss_rows

__version__ = "0.1.0"


def __getattr__(name: str):
    # The estimator pulls in scikit-learn and matplotlib: import it only when asked for.
    if name == "ParametricSNE":
        from beyond_icon.parametric_sne import ParametricSNE

        return ParametricSNE
    raise AttributeError(f"module 'beyond_icon' has no attribute {name!r}")


__all__ = [
    "InfiniteDivergenceError",
    "LossStats",
    "ParametricSNE",
    "__version__",
    "divergences",
    "icon_loss",
    "icon_loss_rows",
    "kernels",
    "methods",
    "value_checks",
]
