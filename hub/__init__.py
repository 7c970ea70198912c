"""The fieldsync hub: consolidates every office's changes and serves them back."""
