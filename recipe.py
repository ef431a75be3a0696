"""DRAEM's training recipes in one table: the official code's and the paper's.

The anomaly simulation (perlin.py) reads the blend range, the normal-image rotation and the anomaly-free
share; the training loop reads the learning-rate milestones and decay; the ``--recipe`` help is built
from the same rows. The two differ where the paper's text (Zavrtanik et al., ICCV 2021, section 3.3)
and the authors' released code disagree; the code is the default because its checkpoints are the
published numbers.
"""
from dataclasses import dataclass


@dataclass(frozen=True)
class Recipe:
    beta_low: float  # blend factor beta ~ U(beta_low, beta_high)
    beta_high: float
    rotate_p: float  # probability of rotating the normal image ...
    rotate_degrees: float  # ... by U(-rotate_degrees, rotate_degrees)
    anomaly_free_p: float = 0.5  # share of samples left without a simulated anomaly
    lr_milestones: tuple[float, ...] = ()  # fractions of the epochs at which the learning rate decays
    lr_decay: float = 1.0  # ... by this factor each time

    def learning_rate(self, base: float, epoch: int, epochs: int) -> float:
        """The learning rate during epoch (0-based) of a run of `epochs` epochs (MultiStepLR's values)."""
        passed = sum(epoch >= round(f * epochs) for f in self.lr_milestones)
        return base * self.lr_decay ** passed

    def describe(self) -> str:
        at = " and ".join(f"{100 * f:.0f}%" for f in self.lr_milestones)
        of_700 = " and ".join(str(round(700 * f)) for f in self.lr_milestones)
        return (f"beta U({self.beta_low:g}, {self.beta_high:g}), normal image rotated by U(-{self.rotate_degrees:g}, "
                f"{self.rotate_degrees:g}) deg with p {self.rotate_p:g}, {100 * self.anomaly_free_p:.0f}% anomaly-free, "
                f"LR x{self.lr_decay:g} at {at} of the epochs (epochs {of_700} of 700)")


RECIPES = {
    # The authors' code: MultiStepLR at 0.8 and 0.9 of the epochs, gamma 0.2.
    "official": Recipe(beta_low=0.0, beta_high=0.8, rotate_p=0.3, rotate_degrees=90.0,
                       lr_milestones=(0.8, 0.9), lr_decay=0.2),
    # The paper's text: x0.1 after epochs 400 and 600 of 700 (scaled to --epochs). It gives no rotation
    # probability, so the code's 0.3 is kept.
    "paper": Recipe(beta_low=0.1, beta_high=1.0, rotate_p=0.3, rotate_degrees=45.0,
                    lr_milestones=(400 / 700, 600 / 700), lr_decay=0.1),
}
