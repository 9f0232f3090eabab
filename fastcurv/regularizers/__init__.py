"""Regularizers as drop-in loss terms: construct, track the forward if needed, call, add to the loss."""
