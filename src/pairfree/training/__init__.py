"""The shared training layer: the trainer, text-only training, the adversarial SCST phase and
its rewards. Recipes build on these and never on each other."""
