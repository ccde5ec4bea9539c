"""VisCoIN analyses: the test-time evaluation and its metrics, concept analytics, amplification, heat maps and
the report figures, over a trained ensemble (models.viscoin_io)."""
