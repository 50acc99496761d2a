"""``linc``: LiNC (Lightweight Noise Correction) as a benchmark method.

The same hook as ``noisescore clean`` (:class:`~noisescore.ml.linc.LiNC`): one trust
parameter ``alpha_i`` per sample, the target ``(1 - alpha_i) softmax + alpha_i onehot``
during the warm-up epochs with alpha's manual gradient step, Otsu's threshold on the
alpha histogram at the end of warm-up, flagged labels replaced by the model's prediction,
then plain cross-entropy on the corrected labels for the remaining epochs. Registered
here so that the benchmark trains it from the same registry and loop as every other
method; its defaults are the paper's (10 warm-up epochs of 100, alpha lr 1, weight decay
1e-3).
"""

from __future__ import annotations

from torch import nn

from noisescore.ml.linc import AlphaGrad, LiNC
from noisescore.ml.methods.base import Method, MethodError, register_method
from noisescore.ml.train import Trainer

__all__ = ["LiNCMethod"]


@register_method("linc")
class LiNCMethod(Method, LiNC):
    """LiNC as a registered method (see :class:`~noisescore.ml.linc.LiNC` for the fitted
    results ``trust_``, ``flagged_``, ``corrected_labels_``).

    Parameters
    ----------
    n_samples, n_classes : int
    peer : None
        One network.
    warmup_epochs : int
        ``w``: alpha trains for these epochs; the correction happens at the end of ``w``.
    alpha_lr, alpha_wd : float
        The alpha step's learning rate and weight decay (paper: 1 and 1e-3).
    alpha_grad : {"mean", "sample"}
        Which gradient the alpha step follows (:mod:`noisescore.ml.linc`).
    """

    summary = "per-sample trust alpha, Otsu split, relabel by prediction (LiNC)"
    n_models = 1

    def __init__(
        self,
        *,
        n_samples: int,
        n_classes: int,
        peer: nn.Module | None = None,
        warmup_epochs: int = 10,
        alpha_lr: float = 1.0,
        alpha_wd: float = 1e-3,
        alpha_grad: AlphaGrad = "mean",
    ):
        Method.__init__(self, n_samples=n_samples, n_classes=n_classes, peer=peer)
        if not alpha_lr > 0 or not alpha_wd >= 0:
            raise MethodError(
                f"alpha_lr must be > 0 and alpha_wd >= 0, got {alpha_lr!r}, {alpha_wd!r}"
            )
        try:
            LiNC.__init__(
                self,
                n_classes,
                warmup_epochs=warmup_epochs,
                alpha_lr=alpha_lr,
                alpha_wd=alpha_wd,
                alpha_grad=alpha_grad,
            )
        except ValueError as err:
            raise MethodError(f"method 'linc': {err}") from None

    def on_train_start(self, trainer: Trainer) -> None:
        if trainer.n_samples != self.n_samples:
            raise MethodError(
                f"method 'linc' was built for n_samples={self.n_samples}, "
                f"the trainer has {trainer.n_samples}"
            )
        if trainer.config.epochs < self.warmup_epochs:
            raise MethodError(
                f"method 'linc': warmup_epochs ({self.warmup_epochs}) must not exceed the "
                f"epochs ({trainer.config.epochs})"
            )
        LiNC.on_train_start(self, trainer)
