"""Operating-system primitives every layer may use: process identity and liveness."""
