"""Retrieval evaluation: embedding indexes, the BIOSCAN protocol (micro/macro top-k per rank, seen/unseen/H.M.),
the novelty flag, queries and figures."""
