"""The ST-LLM method's pieces, each one short named function or module (Liu et al., ECCV 2024; the recipe is
in the paper's code): global-local fusion, dynamic masking, the masked-video-modelling loss."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass
class STLLMConfig:
    """Method settings. Defaults follow the paper's code (notes/stllm-method.md)."""

    global_bottleneck: int = 1024
    # What the global part averages over the frames: "tokens", the projected tokens (the original: after the
    # Q-Former and llama_proj; what a converted release was trained with), or "features", the encoder's
    # features, projected once. The same for a linear connector; for an MLP connector "tokens" gave the
    # global part video-level answers that every window then repeated (builtin demo, seed 0: round-1
    # held-out mAP@0.5 0.009 vs 0.426 with "features"; bench/HISTORY.md), so fresh models use "features".
    global_mean: str = "features"
    mask_mean: float = 0.5
    mask_std: float = 0.1
    mask_min: float = 0.1
    mask_max: float = 0.7
    mvm_weight: float = 1.0
    lora_r: int = 8
    lora_alpha: int = 16
    # no dropout on the adapters' input: on a CPU its random masks were a fifth of a training step (the
    # decoder's q/k/v/o inputs, student and teacher pass); line round 1 without it, seeds 0 / 2: held-out
    # mAP@0.5 0.741 / 0.714 (bench/README.md). Masking already regularises the video part.
    lora_dropout: float = 0.0
    lora_targets: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])

    def __post_init__(self) -> None:
        if self.global_mean not in ("features", "tokens"):
            raise ValueError(f"global_mean must be 'features' or 'tokens', got {self.global_mean!r}")


class GlobalLocalFusion(nn.Module):
    """local + up(relu(down(g))), g = mean over all frames. ``up`` starts at zero, so at initialisation the
    fused input is exactly the plain local input, whatever the global frames."""

    def __init__(self, dim: int, bottleneck: int):
        super().__init__()
        self.down = nn.Linear(dim, bottleneck)
        self.up = nn.Linear(bottleneck, dim)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, local: torch.Tensor, global_mean: torch.Tensor) -> torch.Tensor:
        # local (B, T, K, D); global_mean (B, K, D) -> (B, T, K, D)
        return local + self.up(F.relu(self.down(global_mean))).unsqueeze(1)


def sample_mask_ratio(cfg: STLLMConfig, generator: torch.Generator | None = None) -> float:
    """One masking ratio per batch: rho ~ N(mean, std), clipped to [min, max]."""
    rho = cfg.mask_mean + cfg.mask_std * float(torch.randn(1, generator=generator))
    return min(max(rho, cfg.mask_min), cfg.mask_max)


def keep_positions(
    batch: int, length: int, rho: float, generator: torch.Generator | None = None
) -> torch.Tensor:
    """(B, n_keep) sorted indices of the video tokens each sample keeps; n_keep = L - int(rho * L), the
    same count for every sample, each with its own random positions. Sorting keeps frame order."""
    n_keep = length - int(rho * length)
    scores = torch.rand(batch, length, generator=generator)
    return scores.topk(n_keep, dim=1).indices.sort(dim=1).values


def gather_tokens(tokens: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """(B, L, D) gathered at (B, n) positions -> (B, n, D)."""
    return tokens.gather(1, keep.to(tokens.device).unsqueeze(-1).expand(-1, -1, tokens.shape[-1]))


class MVMHead(nn.Module):
    """Linear + LayerNorm on the student's hidden states before they are compared to the teacher's."""

    def __init__(self, dim: int):
        super().__init__()
        self.proj = nn.Linear(dim, dim)
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.proj(x))


def mvm_loss(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Mean of 2 - 2 cos(student, teacher) over tokens: 0 when they align, 4 when opposite."""
    s = F.normalize(student.float(), dim=-1)
    t = F.normalize(teacher.float(), dim=-1)
    return (2 - 2 * (s * t).sum(-1)).mean()
