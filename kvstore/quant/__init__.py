"""On-device KV quantization: pure quantize/pack functions and the `QuantizedKVCache` transformers Cache."""
