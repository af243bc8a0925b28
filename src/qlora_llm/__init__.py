"""qlora-llm: from raw data to a served, QLoRA fine-tuned LLM on one consumer GPU.

Layers: `qlora_llm.data.prepare` (data), then training, evaluation and serving as they land.
"""

import logging

__version__ = "0.1.0"

# A library logs; whoever runs it decides where logs go (the CLI configures logging).
logging.getLogger(__name__).addHandler(logging.NullHandler())
