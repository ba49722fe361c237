"""entropy_jax: watch the representation geometry of a language model change while it learns."""
