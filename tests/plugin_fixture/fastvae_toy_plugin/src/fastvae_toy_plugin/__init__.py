"""A toy fastvae plugin: importing .architecture registers `toy_mlp`; .likelihood, .objective and
.prior hold the declarations `toy_laplace`, `toy_renyi_half` and `toy_learned_gaussian` that their
entry points name."""
