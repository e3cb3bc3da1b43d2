"""The models: the VAE, its likelihoods and objectives, and the registry of encoder/decoder architectures."""
