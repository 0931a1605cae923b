"""taskvec: task vectors of fine-tuned transformers seen through the pretrained model's eNTK."""

__version__ = "0.1.0"
