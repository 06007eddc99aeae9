"""Network parts the engines share: degradation-guided LoRA, the degradation estimator, the tiled VAE."""
