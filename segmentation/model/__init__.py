"""The model library: PaliGemma 2 prompts, grammar-constrained generation, token parsing, the JAX
mask decoder, mask pasting, result types and their encodings.

Modules that need torch (`engine`, `grammar`, `segmenter`) or JAX (`vae`) are only imported when
used, so the light ones (`tokens`, `prompts`, `masks`, `results`, `encoding`, `images`) load fast.
"""
