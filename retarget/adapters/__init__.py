"""Adapters that steer the Arc2Face UNet: expression (IP-Adapter tokens) and reference (self-attention bank)."""
