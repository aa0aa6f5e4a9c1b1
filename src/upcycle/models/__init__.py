"""Bases: loading Hugging Face models, model surgery, the tiny-base pretraining recipe, GGUF conversion.

Reading order:
- `base`        load a HF causal LM (directory, hub id, GGUF) as a frozen base
- `surgery`     find SwiGLU FFNs and linear projections, replace modules by dotted name (every method uses it)
- `tokenizer`, `pretrain`   the byte-level BPE tokenizer and the recipe behind the embedded tiny base
- `gguf`        convert a Llama-family GGUF file into a cached HF directory
- `commands`    the CLI
"""
