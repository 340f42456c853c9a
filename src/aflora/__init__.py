"""aflora: federated LoRA fine-tuning of LLMs on heterogeneous clients (AFLoRA and its baselines, on Flower)."""

__version__ = "0.1.0"
