"""A toy fastvae plugin: importing .architecture registers `toy_mlp`; .likelihood and .objective
hold the declarations `toy_laplace` and `toy_renyi_half` that their entry points name."""
