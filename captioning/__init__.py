"""Image captioning: word tokenizer, attention decoder over the image tower's grid, beam search."""
