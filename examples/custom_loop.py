"""Use fastgrpo's fused loss from your own training loop (or a TRL/verl subclass).

The model runs its backbone only; the loss takes the final hidden states and the lm_head
weight, so full-vocabulary logits are never built. Runs on CPU with a tiny Qwen2 model:

    python examples/custom_loop.py
"""

import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

import fastgrpo

torch.manual_seed(0)
config = Qwen2Config(
    vocab_size=512,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    tie_word_embeddings=True,
)
model = Qwen2ForCausalLM(config)
optim = torch.optim.AdamW(model.parameters(), lr=1e-3)

# One GRPO micro-batch: 2 prompts x G=4 completions, prompt length 8, completions up to 24 tokens.
G, P, C = 4, 8, 24
input_ids = torch.randint(0, 512, (2 * G, P + C))
completion_mask = torch.arange(C)[None, :] < torch.randint(6, C + 1, (2 * G, 1))
rewards = torch.rand(2, G)
advantages = ((rewards - rewards.mean(1, keepdim=True)) / (rewards.std(1, keepdim=True) + 1e-4)).view(-1)
attention_mask = torch.cat([torch.ones(2 * G, P, dtype=torch.bool), completion_mask], dim=1)

with torch.no_grad():  # old policy log-probs, e.g. computed once per generation batch
    hidden = model.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
    old = fastgrpo.chunked_logprobs(hidden[:, P - 1 : -1], model.lm_head.weight, input_ids[:, P:])

for step in range(3):
    hidden = model.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
    out = fastgrpo.fused_grpo_loss(
        hidden[:, P - 1 : -1],  # positions that predict the completion tokens
        model.lm_head.weight,
        input_ids[:, P:],
        completion_mask,
        advantages,
        old_logprobs=old,
        loss_type="dapo",
        epsilon=0.2,
        epsilon_high=0.28,
    )
    optim.zero_grad()
    out.loss.backward()
    optim.step()
    print(
        f"step {step}: loss {out.loss.item():+.4f}  entropy {out.metrics['entropy'].item():.3f}  "
        f"clip {out.metrics['clip_ratio/region_mean'].item():.3f}"
    )
