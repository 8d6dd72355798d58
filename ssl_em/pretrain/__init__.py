"""Self-supervised pretraining methods: plain ``nn.Module``s returning a loss (LightningModules wrap them)."""
