"""What trains: QLoRA adapters over a quantized base (qlora), quantization-aware training (qat), and the
short training loop on real text they share (loop).
"""
