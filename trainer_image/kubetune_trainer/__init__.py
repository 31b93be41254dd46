"""kubetune trainer: fine-tunes one FineTuneJob with transformers + peft (+ bitsandbytes)."""

__version__ = "0.1.0"
