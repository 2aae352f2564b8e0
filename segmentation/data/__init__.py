"""Data tools: turning users' own masks into PaliGemma training text, building fine-tuning sets,
evaluating models with big_vision's metrics, and labelling folders of images."""
