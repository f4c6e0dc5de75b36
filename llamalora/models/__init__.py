"""The base models llamalora trains: where they are cached, the built-in short names, and how
they load.

    home      the cache folder (`$LLAMALORA_HOME`) and its atomic, built-once subfolders
    names     the short names (`tiny`, `tiny-qwen2-vl`, `smollm2`) -> their cached folders
    tiny, tiny_qwen2_vl, smollm2   what builds each of those folders
    loading   a checkpoint -> a frozen, quantized model ready for LoRA, generation or export
    lora      LoRA on the language model's projections

What differs between model families (Mllama, Llama, Qwen2-VL) is asked of `llamalora.families`;
quantization is `llamalora.quant`.
"""
