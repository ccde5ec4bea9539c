"""Visual DNA pipeline: image sources, making and calibrating VDNAs with a feature extractor, comparing them
and plotting the comparison (the VDNA object and its distances are domain-free, in core.vdna)."""
