"""The exact ReLU flow as one compiled program (see `driver`)."""
