"""Faces, the SMIRK expression encoder, temporal smoothing and the track file."""
