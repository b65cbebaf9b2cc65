"""Drafter training by self-distillation: the target writes the answers (datagen), the drafter
learns to predict them from the target's hidden states (train)."""
