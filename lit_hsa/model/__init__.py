"""The model: plain ``nn.Module``s, no Lightning, no decoding engine (``lit_hsa.inference`` drives decoding).
``transformer.HSATransformer`` is the whole network; ``hsa`` holds the chunk memory, retrieval and HSA block;
``attention``, ``moe``, ``loss`` and ``lora`` the parts it is built from."""
