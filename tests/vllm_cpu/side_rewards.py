"""A reward with spread on a random model's completions, for the real-vLLM training check."""


def digits(prompts, completions, **columns):
    """The number of digits in each completion."""
    return [float(sum(ch.isdigit() for ch in c)) for c in completions]
