"""Weight converters between Meta's, Hugging Face's and this project's checkpoint formats."""

FORMATS = ("hf", "meta", "jax")  # the --from / --to names of `llama-jax convert`
