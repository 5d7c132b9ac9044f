"""beyond-icon: the I-Con loss ``mean_i D(p(.|i) || q(.|i))`` with any divergence D."""

from beyond_icon import divergences, kernels, methods
from beyond_icon.divergences import InfiniteDivergenceError
from beyond_icon.loss import LossStats, icon_loss, icon_loss_rows

__version__ = "0.1.0"

__all__ = [
    "InfiniteDivergenceError",
    "LossStats",
    "__version__",
    "divergences",
    "icon_loss",
    "icon_loss_rows",
    "kernels",
    "methods",
]
