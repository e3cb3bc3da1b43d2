"""A toy fastvae architecture plugin; importing .architecture registers `toy_mlp`."""
