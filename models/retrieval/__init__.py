"""Retrieval across images, DNA barcodes and taxonomy (BIOSCAN-CLIP / CLIBD): the encoders and the CLIP-style
model around them."""

from models.retrieval.clip import RetrievalModel, RetrievalSpec, load_retrieval_model

__all__ = ["RetrievalModel", "RetrievalSpec", "load_retrieval_model"]
