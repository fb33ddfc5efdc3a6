"""The step-level generation engine: slots, packed prefill, shared prefix, 4-bit decode."""
