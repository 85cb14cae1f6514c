"""megatron-recycle: GRPO with query recycling for LLM search agents."""
__version__ = "0.1.0"
