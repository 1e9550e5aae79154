"""Group-relative advantages (outcome and process supervision) and DAPO's group filter."""

from __future__ import annotations

import torch

STD_EPS = 1e-4  # added to the std, as TRL does, so a near-constant group does not explode


def _group_view(rewards: torch.Tensor, num_generations: int) -> torch.Tensor:
    if rewards.dim() != 1 or rewards.numel() % num_generations:
        raise ValueError(
            f"rewards must be 1-D with a multiple of num_generations ({num_generations}) values, "
            f"got shape {tuple(rewards.shape)}"
        )
    return rewards.view(-1, num_generations)


def group_reward_stats(rewards: torch.Tensor, num_generations: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-completion (group mean, group std) in float64, NaN-aware: rows whose reward is NaN (every
    reward function returned None) are left out of their group's statistics. float64 because the
    squares of rewards above about 1.8e19 overflow float32, which zeroed every advantage of the group."""
    g = _group_view(rewards.to(torch.float64), num_generations)
    valid = ~torch.isnan(g)
    count = valid.sum(1, keepdim=True)
    mean = torch.where(valid, g, 0.0).sum(1, keepdim=True) / count.clamp(min=1)
    var = torch.where(valid, (g - mean) ** 2, 0.0).sum(1, keepdim=True) / (count - 1).clamp(min=1)
    std = torch.where(count > 1, var.sqrt(), 0.0)  # unbiased, like torch.std
    return mean.expand_as(g).reshape(-1), std.expand_as(g).reshape(-1)


def compute_advantages(rewards: torch.Tensor, num_generations: int, scale_rewards: str = "group") -> torch.Tensor:
    """(r - group mean) / (std + 1e-4) per completion; NaN rewards get advantage 0.

    Args:
        rewards: (N,) float, groups of ``num_generations`` contiguous.
        scale_rewards: "group" (each group's std), "batch" (std over the whole batch),
            or "none" (no division: Dr. GRPO).

    Returns:
        (N,) float32 advantages, computed in float64. ValueError when one does not fit float32.
    """
    rewards = rewards.to(torch.float64)
    mean, std = group_reward_stats(rewards, num_generations)
    centered = rewards - mean
    if scale_rewards == "group":
        adv = centered / (std + STD_EPS)
    elif scale_rewards == "batch":
        valid = rewards[~torch.isnan(rewards)]
        batch_std = valid.std() if valid.numel() > 1 else rewards.new_zeros(())
        adv = centered / (batch_std + STD_EPS)
    elif scale_rewards == "none":
        adv = centered
    else:
        raise ValueError(f"scale_rewards must be 'group', 'batch' or 'none', got {scale_rewards!r}")
    return _to_float32(torch.nan_to_num(adv, nan=0.0), scale_rewards)


def _to_float32(adv: torch.Tensor, scale_rewards: str) -> torch.Tensor:
    """float64 advantages as float32, refused where one is beyond float32's range (only unscaled ones of
    rewards near float32's limit get there; ``RewardScorer`` keeps its rewards within half of it)."""
    out = adv.to(torch.float32)
    if not out.isfinite().all():
        worst = adv.abs().max().item()
        raise ValueError(
            f"an advantage of {worst:.3g} (scale_rewards={scale_rewards!r}) is beyond float32's range: the "
            "rewards differ by too much; scale the reward functions down"
        )
    return out


def process_advantages(
    steps: list[list[tuple[int, float]]], num_generations: int, length: int, scale_rewards: str = "group"
) -> torch.Tensor:
    """DeepSeekMath process supervision: step rewards are normalized over every step of the
    group, and a token's advantage is the sum of the normalized rewards of the steps that end
    at or after it.

    Args:
        steps: per completion, (completion token index that ends the step, reward) pairs.
        length: T, the completion width of the returned tensor.

    Returns:
        (N, T) float32 per-token advantages.
    """
    n = len(steps)
    if n % num_generations:
        raise ValueError(f"got {n} completions, not a multiple of num_generations ({num_generations})")
    out = torch.zeros(n, length + 1, dtype=torch.float64)
    all_rewards = [r for s in steps for _, r in s]
    batch_std = torch.tensor(all_rewards, dtype=torch.float64).std() if len(all_rewards) > 1 else 0.0
    for start in range(0, n, num_generations):
        group = steps[start : start + num_generations]
        values = torch.tensor([r for s in group for _, r in s], dtype=torch.float64)
        if values.numel() == 0:
            continue
        mean = values.mean()
        std = values.std() if values.numel() > 1 else torch.zeros((), dtype=torch.float64)
        scale = {"group": std + STD_EPS, "batch": batch_std + STD_EPS, "none": 1.0}[scale_rewards]
        for row, s in enumerate(group, start):
            for index, reward in s:
                # The normalized reward lands on the step's last token; a reverse cumulative sum
                # then hands each token the rewards of every step ending at or after it.
                out[row, min(index, length - 1)] += (reward - mean) / scale
    return _to_float32(out[:, :length].flip(1).cumsum(1).flip(1), scale_rewards)


def zero_std_groups(rewards: torch.Tensor, num_generations: int, atol: float = 1e-6) -> torch.Tensor:
    """(num_groups,) bool: groups whose rewards are all equal (no learning signal; DAPO drops them).

    NaN rows (no reward) are ignored, as in the advantages, so a group counts as zero-std when
    fewer than two of its rewards are known or the known ones are equal."""
    g = _group_view(rewards.to(torch.float64), num_generations)  # float32 would merge rewards 1 apart at 1e10
    valid = ~torch.isnan(g)
    spread = torch.where(valid, g, -torch.inf).max(1).values - torch.where(valid, g, torch.inf).min(1).values
    return ~(spread > atol)
