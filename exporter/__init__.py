"""Export a Hugging Face model into the graphs a phone needs to train LoRA adapters (see README)."""
import logging

# torchao (pulled in by executorch) logs a warning for every optional CUDA kernel it cannot load, and
# torch warns about its Enum registrations: noise for a user of this CPU tool.
for _name in ("torchao", "torch.utils._pytree", "coremltools"):
    logging.getLogger(_name).setLevel(logging.ERROR)
