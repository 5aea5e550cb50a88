"""Components of the demo teacher: its config, its corpus (the standard library), its tokenizer and model."""
