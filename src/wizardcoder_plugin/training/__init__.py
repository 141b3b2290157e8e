"""Training: data preprocessing to MindRecord, loss and AdamW, run settings, the training loop."""
