"""Training recipes: losses, samplers, the joint / decoupled / progressive recipes, checkpoints."""
