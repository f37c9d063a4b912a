"""Generator backends that make the synthetic set: the offline class-conditional DDPM (`ddpm`)."""
