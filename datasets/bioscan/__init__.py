"""BIOSCAN data: the HDF5 layout of BIOSCAN-1M/5M (reader and the synthetic world's exporter), DNA barcodes
(validation, FASTA, BarcodeBERT k-mer tokens) and taxonomy text tokens."""
