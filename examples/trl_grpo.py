"""TRL's GRPO recipe on GSM8K, with fastgrpo's trainer: one import line differs from stock TRL.

    python examples/trl_grpo.py                 # Qwen2.5-0.5B-Instruct on openai/gsm8k (downloads)
    python examples/trl_grpo.py --tiny          # offline: fastgrpo's embedded tiny model and task
    accelerate launch --num_processes 8 examples/trl_grpo.py   # 8 GPUs, DDP
    accelerate launch --config_file fsdp2.yaml examples/trl_grpo.py   # or a DeepSpeed / FSDP config

The rewards are plain functions ``(prompts, completions, **columns) -> list[float]``; TRL hands
them the dataset's other columns (here ``answer``) as keyword arguments. It needs TRL, an extra of
fastgrpo: ``pip install 'fastgrpo[trl]'``.
"""

import argparse
import sys

from fastgrpo.integrations import trl_missing

if trl_missing():  # one line naming the extra, rather than a traceback ending in "No module named 'trl'"
    sys.exit(f"trl_grpo.py: error: {trl_missing()}")

from datasets import load_dataset  # noqa: E402
from trl import GRPOConfig  # noqa: E402

from fastgrpo.integrations.trl import GRPOTrainer  # noqa: E402  (stock TRL: from trl import GRPOTrainer)
from fastgrpo.train.rewards import accuracy_reward, format_reward  # noqa: E402

SYSTEM = "Think step by step inside <think></think>, then give only the final number inside <answer></answer>."


def gsm8k():
    data = load_dataset("openai/gsm8k", "main", split="train")
    return data.map(
        lambda row: {
            "prompt": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": row["question"]}],
            "answer": row["answer"].split("####")[-1].strip(),
        },
        remove_columns=data.column_names,
    )


def tiny():
    """The embedded default of ``fastgrpo train``: a tiny Qwen2 and single-digit additions, built
    once into fastgrpo's cache (``FASTGRPO_CACHE``, default ~/.cache/fastgrpo)."""
    from fastgrpo.train.embedded import cache_dir, prepare_embedded

    model_dir, data_file = prepare_embedded(cache_dir())
    data = load_dataset("json", data_files=str(data_file), split="train")
    data = data.map(lambda row: {"prompt": [{"role": "user", "content": row["prompt"]}]})
    return str(model_dir), data


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="offline: the embedded tiny model and task, on CPU")
    parser.add_argument("--output_dir", default=None)
    parser.add_argument("--max_steps", type=int, default=None)
    args = parser.parse_args(argv)

    if args.tiny:
        model, dataset = tiny()
        config = dict(
            per_device_train_batch_size=32,
            num_generations=8,
            max_completion_length=16,
            learning_rate=3e-4,
            max_steps=args.max_steps or 20,
            use_cpu=True,
            bf16=False,
        )
    else:
        model, dataset = "Qwen/Qwen2.5-0.5B-Instruct", gsm8k()
        config = dict(
            per_device_train_batch_size=8,
            gradient_accumulation_steps=4,
            num_generations=8,
            max_completion_length=1024,
            learning_rate=1e-6,
            max_steps=args.max_steps or 500,
            gradient_checkpointing=True,
        )
    training_args = GRPOConfig(
        output_dir=args.output_dir or ("trl-grpo-tiny" if args.tiny else "Qwen2.5-0.5B-GRPO-fastgrpo"),
        loss_type="dapo",
        beta=0.0,
        epsilon_high=0.28,
        reward_weights=[0.75, 0.25],
        logging_steps=1,
        report_to="none",
        save_strategy="no" if args.tiny else "steps",
        **config,
    )
    trainer = GRPOTrainer(
        model=model,
        reward_funcs=[accuracy_reward, format_reward],
        args=training_args,
        train_dataset=dataset,
    )
    trainer.train()
    rewards = [row["reward"] for row in trainer.state.log_history if "reward" in row]
    print(f"reward: first step {rewards[0]:.3f}, last step {rewards[-1]:.3f}; path {trainer.fastgrpo_last_route}")
    return trainer


if __name__ == "__main__":
    main()
