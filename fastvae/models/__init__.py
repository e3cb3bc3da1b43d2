"""The models: the VAE, its likelihoods, priors and objectives, and the registry of encoder/decoder architectures."""
