"""optrush: train and fine-tune Llama-family LLMs with every efficiency method as one config switch."""
