"""The miniature world: procedural portraits with exact ground truth, and their captions."""
