"""SlideChat-style whole-slide vision-language assistant: model, instruction data, training, evaluation."""

__version__ = "0.1.0"
